"""Steering spread over several decoder layers (`SteeringSpec.layers`): the layers other than the SAE's.

The SAE hook steers at the SAE's own layer; this interceptor adds each row's steering at the other
layers its spec names (compiled per layer in `CompiledSteering.other_layers`, already scaled to the
layer's residual norm), with the same position rules (`apply_steering`). It hooks every decoder layer
once; a layer no row steers costs one dictionary lookup per forward pass.

It also measures what the spread needs: the median residual norm after each decoder layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from engine.interceptors import ForwardContext
from engine.sae import decoder_layers
from engine.steering import CompiledSteering, SteeringBatch, apply_steering, batch_steering

# A neutral text to measure residual norms on (the first position, an attention sink, is left out).
NORM_PROBE_TEXT = (
    "The morning was quiet. She made a cup of tea, opened the window and read the letter again, "
    "slowly this time, wondering what her brother had meant by the last line."
)


@torch.no_grad()
def residual_norms(model: torch.nn.Module, token_ids: Sequence[int]) -> list[float]:
    """Median L2 norm of the residual stream after each decoder layer, over `token_ids[1:]`."""
    layers = decoder_layers(model)
    norms: list[float] = [0.0] * len(layers)
    handles = []
    for index, layer in enumerate(layers):
        def hook(_module: Any, _inputs: Any, output: Any, index: int = index) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            norms[index] = float(hidden[0, 1:].float().norm(dim=-1).median())
        handles.append(layer.register_forward_hook(hook))
    device = next(model.parameters()).device
    try:
        model(input_ids=torch.tensor([list(token_ids)], device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return norms


class LayerSteeringHook:
    """A ForwardInterceptor that steers rows at the layers their spec spreads over (not the SAE's own)."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._context: ForwardContext | None = None
        self._context_rows: tuple[Any, ...] | None = None
        self._rows: tuple[Any, ...] | None = None
        self._batches: dict[int, SteeringBatch] = {}  # layer -> stacked rows, for self._rows
        self._default: CompiledSteering | None = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, model: torch.nn.Module) -> None:
        self.detach()
        for index, layer in enumerate(decoder_layers(model)):
            self._handles.append(layer.register_forward_hook(
                lambda module, args, output, index=index: self._on_layer_output(index, output)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._context = None
        self._context_rows = None
        self._rows = None
        self._batches = {}
        self._default = None

    def set_default_steering(self, steering: CompiledSteering | None) -> None:
        """Steering for plain forward passes (no context), as SaeHook.set_default_steering."""
        self._default = steering
        self._rows = None

    # ForwardInterceptor -------------------------------------------------------------------------

    def set_context(self, context: ForwardContext | None) -> None:
        self._context = context
        self._context_rows = tuple(row.steering for row in context.rows) if context is not None else None

    def collect(self) -> dict[str, Any]:
        return {}

    # The hot path ---------------------------------------------------------------------------------

    def _on_layer_output(self, layer: int, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        batch = self._batch_for(layer, hidden)
        if batch is None:
            return None
        context = self._context
        if context is None:
            steered = apply_steering(hidden, batch)
        else:
            steered = apply_steering(hidden, batch, context.generated_mask.to(hidden.device),
                                     context.valid_mask.to(hidden.device))
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    def _batch_for(self, layer: int, hidden: torch.Tensor) -> SteeringBatch | None:
        if self._context_rows is not None:
            rows = self._context_rows
        elif self._default is not None:
            rows = (self._default,) * hidden.shape[0]
        else:
            return None
        if rows != self._rows:
            # A new set of rows: stack each spread layer's steerings once (cached until the rows change).
            self._rows, self._batches = rows, {}
            layers = {n for s in rows if s is not None and s.other_layers for n in s.other_layers}
            for n in layers:
                per_row = [s.other_layers.get(n) if s is not None and s.other_layers else None for s in rows]
                self._batches[n] = batch_steering(per_row, device=hidden.device, dtype=hidden.dtype)
        return self._batches.get(layer)
