"""Steering vectors: a raw direction added to the output of a decoder layer (per request, the active
steering, profiles), and the active SAE steering exported as a control vector.

Math, per token with h_l the output of decoder block l (0-based, the same numbering as an SAE's
`hook_layer` and as llama.cpp's `direction.l`, see engine/control_vector_files.py):
h_l' = h_l + Σ_v s_v · d_v[l] for every vector v with a direction at layer l.

Vectors reach the hot path as additive `CompiledSteering.other_layers` (applied by
`engine/steering_layers.py`, whose hook is attached at model load), merged into a row's SAE steering
once per spec (`with_vectors`), so a batch mixes rows with and without vectors at the cost of one
stacked add per steered layer, and vectors work with no SAE attached.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from engine.control_vector_files import ControlVector
from engine.errors import InvalidSteeringError
from engine.rules import MAX_ABS_STRENGTH
from engine.sae import decoder_layers
from engine.steering import CompiledSteering, SteeringSpec


@dataclass(frozen=True, eq=False)  # identity equality: a spec holding one stays cheap to hash
class LayerVector:
    """One steering vector of a request or the active steering: Σ over its layers of strength · direction."""

    directions: dict[int, torch.Tensor]  # layer -> (d_model,)
    strength: float = 1.0
    name: str = ""  # a stored vector's name, for reports


@dataclass(frozen=True)
class VectorSteeringSpec(SteeringSpec):
    """A steering spec that also adds raw vectors (a subclass, so every SteeringSpec consumer takes it)."""

    vectors: tuple[LayerVector, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "vectors", tuple(self.vectors))


def spec_vectors(spec: SteeringSpec | None) -> tuple[LayerVector, ...]:
    return getattr(spec, "vectors", ()) if spec is not None else ()


def add_spec_vectors(compiled: CompiledSteering | None, spec: SteeringSpec, model: torch.nn.Module,
                     ) -> CompiledSteering | None:
    """The compiled SAE steering (None: no SAE features) with the spec's vectors merged in, after
    checking them against the model (width = hidden size, layer < number of decoder layers)."""
    vectors = spec_vectors(spec)
    if not vectors:
        return compiled
    d_model = int(model.config.hidden_size)
    validate_vectors(vectors, d_model=d_model, num_layers=len(decoder_layers(model)))
    device = compiled.feature_indices.device if compiled is not None else model_device(model)
    deltas = vector_deltas(vectors, device=device, dtype=torch.float32)
    return with_vectors(compiled, spec, deltas, d_model=d_model, device=device, dtype=torch.float32)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def validate_vectors(vectors: Sequence[LayerVector], *, d_model: int, num_layers: int,
                     max_abs_strength: float = MAX_ABS_STRENGTH) -> None:
    """Raise InvalidSteeringError unless every vector fits this model (width, layers, finite values)."""
    for position, vector in enumerate(vectors):
        label = f"vectors[{position}]" + (f" ({vector.name})" if vector.name else "")
        strength = vector.strength
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength):
            raise InvalidSteeringError(f"{label}.strength must be a finite number, got {strength!r}")
        if abs(strength) > max_abs_strength:
            raise InvalidSteeringError(f"{label}.strength {strength} exceeds the bound ±{max_abs_strength:g}")
        if not vector.directions:
            raise InvalidSteeringError(f"{label} has no layer")
        for layer, direction in vector.directions.items():
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
                raise InvalidSteeringError(f"{label}.layer {layer!r} must be an integer in [0, {num_layers})")
            if direction.ndim != 1 or direction.shape[0] != d_model:
                raise InvalidSteeringError(
                    f"{label}: the vector at layer {layer} has width {direction.shape[-1] if direction.ndim else 0}; "
                    f"this model's residual stream has width {d_model}")
            if not bool(torch.isfinite(direction).all()):
                raise InvalidSteeringError(f"{label}: the vector at layer {layer} has a NaN or infinite entry")


def vector_deltas(vectors: Sequence[LayerVector], *, device: torch.device | str, dtype: torch.dtype,
                  ) -> dict[int, torch.Tensor]:
    """Σ_v s_v · d_v[l] per layer l, summed in float32 (computed once per spec)."""
    sums: dict[int, torch.Tensor] = {}
    for vector in vectors:
        for layer, direction in vector.directions.items():
            term = direction.detach().to(device=device, dtype=torch.float32) * float(vector.strength)
            sums[layer] = sums[layer] + term if layer in sums else term
    return {layer: total.to(dtype) for layer, total in sums.items()}


def with_vectors(compiled: CompiledSteering | None, spec: SteeringSpec, deltas: dict[int, torch.Tensor],
                 *, d_model: int, device: torch.device | str, dtype: torch.dtype) -> CompiledSteering | None:
    """The row steering with the vectors' deltas added to its per-layer additive steering.

    Vectors go to `other_layers` at every layer, the SAE's own included. The layer hook is attached at
    model load, before any SAE hook, so at the SAE's layer the vector is added first: the SAE reads
    (monitoring, conditions) the block's output with the vector in it, as its `l_out` in llama.cpp.
    Without SAE features the row still needs an additive (zero) delta at the SAE's layer, since an
    attached SAE hook stacks every row's."""
    if not deltas:
        return compiled
    plain = SteeringSpec(features=(), positions=spec.positions)  # additive, the spec's position rule
    if compiled is None:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        compiled = CompiledSteering(spec=spec, feature_indices=empty,
                                    additive_delta=torch.zeros(d_model, device=device, dtype=dtype))
    layers = dict(compiled.other_layers or {})
    for layer, delta in deltas.items():
        existing = layers.get(layer)
        total = delta if existing is None else existing.additive_delta + delta.to(existing.additive_delta)
        layers[layer] = CompiledSteering(spec=plain, feature_indices=compiled.feature_indices, additive_delta=total)
    return replace(compiled, other_layers=layers)


def steering_control_vector(compiled: CompiledSteering, *, sae_layer: int, model_hint: str,
                            part_layers: Mapping[str, int] | None = None) -> ControlVector:
    """The additive SAE steering as a control vector: Σ s_i W_dec[i] at the SAE's layer and each
    spread layer (already scaled to its norm), plus any vectors it carries. Several SAEs: each other SAE's
    part (`compiled.saes[name]`) at its own layer, `part_layers[name]`."""
    if compiled.mode != "additive":
        raise InvalidSteeringError("only additive steering can be exported as a control vector "
                                   "(clamp depends on each token's own activation)")
    directions: dict[int, np.ndarray] = {}

    def add(layer: int, delta: torch.Tensor | None, *, zero: bool = False) -> None:
        if delta is None or not (zero or bool(delta.any())):
            return
        values = delta.detach().float().cpu().numpy()
        directions[layer] = directions[layer] + values if layer in directions else values

    add(sae_layer, compiled.additive_delta)
    for name, part in (compiled.saes or {}).items():
        if part_layers is None or name not in part_layers:
            raise InvalidSteeringError(f"the layer of SAE {name} is needed to export its part of the steering")
        add(part_layers[name], part.additive_delta)
    for layer, other in (compiled.other_layers or {}).items():
        add(layer, other.additive_delta, zero=True)
    if not directions:
        raise InvalidSteeringError("the steering adds nothing: there is no control vector to export")
    return ControlVector(model_hint=model_hint, directions=directions)


def layer_vector(vector: ControlVector, *, strength: float = 1.0, name: str = "") -> LayerVector:
    return LayerVector({layer: torch.from_numpy(np.array(values, dtype=np.float32))
                        for layer, values in vector.directions.items()}, strength=strength, name=name)
