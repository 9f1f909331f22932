"""Per-feature steering strengths: a recommended strength and a useful range for every feature of an SAE.

Cheap general method, every feature (forward passes only, batched, no generation): steer the last
position of a few calibration prompts along the feature's direction at a few strengths s_1 < … < s_S
and measure how far the next-token distribution moves,

    KL_i(s) = mean over prompts of KL(q_s ‖ p),   p = unsteered next-token distribution, q_s = steered,

then read off the strength where KL_i reaches a target t (piecewise-linear in log s / log KL between the
measured points, extended along the end segments):

    recommended_i = KL_i⁻¹(t),   low_i = KL_i⁻¹(t / 4),   high_i = KL_i⁻¹(4 t).

The prompt prefix runs once (its KV cache is copied per batch), so a row costs one token's forward pass:
S × prompts × d_sae single-token rows in all. The steering is the recipe's: its direction (decoder row
or concept direction) at the SAE's layer, or spread over `layers` scaled to each layer's residual norm
(as engine/steering.py's `_compile_spread` does), at that one position — the first position generated-
only steering touches.

The target t is not a guess: where a generation sweep refined some features (engine/calibration_sweep.py),
t = the median of KL_i at their chosen strengths, so the other features are set to move the model as much
as the ones measured to write their concept fluently. Without a sweep, DEFAULT_TARGET_KL (the demo SAE's).

Strengths are stored raw (the coefficient of the direction); every unit is a division (steering/units.py):
residual_norm = raw / n_L (the hooked layer's median residual norm), max_activation = raw / max_i.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from engine.calibration_file import (  # noqa: F401 - re-exported: the file format, torch-free
    CALIBRATION_FILE,
    CalibrationRecipe,
    read_calibration,
    write_calibration,
)
from engine.sae import decoder_layers

RANGE_FACTOR = 4.0  # low/high: the strengths where KL is a quarter / four times the target
DEFAULT_TARGET_KL = 1.0  # nats; replaced by the demo build's measured value in its calibration.json
# User turns (chat-templated when the model has a template), not the bench's neutral prompts.
KL_PROMPTS = (
    "Describe a place you like.",
    "What should I do this evening?",
)


def strength_grid(strengths: Sequence[float] | torch.Tensor, num_features: int) -> torch.Tensor:
    """(F, S) float64 strengths, ascending per row: a shared grid repeated, or a per-feature one as given."""
    if isinstance(strengths, torch.Tensor) and strengths.dim() == 2:
        return strengths.double()
    return torch.tensor([float(x) for x in strengths], dtype=torch.float64).expand(num_features, -1)


@torch.no_grad()
def next_token_kl(model: torch.nn.Module, prompts: Sequence[Sequence[int]], directions: torch.Tensor,
                  strengths: Sequence[float] | torch.Tensor, *, layer_scales: dict[int, float],
                  rows_per_batch: int = 256, on_progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """(F, S) mean KL(q_s ‖ p) of the next token when `directions[f]` (F, d_in) × the strength (raw; a shared grid
    (S,) or one per feature (F, S)) is added at the last position, at each layer l of `layer_scales` times
    `layer_scales[l]`."""
    num_features = directions.shape[0]
    grid = strength_grid(strengths, num_features)
    num_strengths = grid.shape[1]
    device = next(model.parameters()).device
    directions = directions.to(device=device, dtype=torch.float32)
    scale = grid.to(device=device, dtype=torch.float32)
    total = torch.zeros(num_features, num_strengths)
    current: dict[str, torch.Tensor | None] = {"delta": None}  # (B, d_in) while a steered batch runs
    blocks = decoder_layers(model)

    def hook_at(factor: float) -> Callable[..., Any]:
        def hook(_module: Any, _args: Any, output: Any) -> Any:
            delta = current["delta"]
            if delta is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            steered = hidden + (factor * delta).unsqueeze(1).to(hidden.dtype)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered
        return hook

    handles = [blocks[layer].register_forward_hook(hook_at(factor)) for layer, factor in layer_scales.items()]
    pairs = num_features * num_strengths
    done, work = 0, pairs * len(prompts)
    try:
        for ids in prompts:
            prefix = torch.tensor([list(ids[:-1])], device=device)
            cache = model(input_ids=prefix, use_cache=True).past_key_values
            last = int(ids[-1])
            base = model(input_ids=torch.tensor([[last]], device=device), past_key_values=copy.deepcopy(cache),
                         use_cache=True).logits[0, -1].float().log_softmax(-1)
            for start in range(0, pairs, rows_per_batch):
                flat = torch.arange(start, min(start + rows_per_batch, pairs))
                feature, strength = flat // num_strengths, flat % num_strengths
                rows = feature.to(device)
                current["delta"] = directions[rows] * scale[rows, strength.to(device)].unsqueeze(1)
                rows_cache = _broadcast_cache(cache, len(flat))  # the prefix's keys/values, shared by every row
                try:
                    logits = model(input_ids=torch.full((len(flat), 1), last, device=device),
                                   past_key_values=rows_cache, use_cache=True).logits[:, -1].float()
                finally:
                    current["delta"] = None
                steered = logits.log_softmax(-1)
                kl = (steered.exp() * (steered - base)).sum(-1).clamp_min(0).cpu()
                total.index_put_((feature, strength), kl, accumulate=True)
                done += len(flat)
                if on_progress is not None:
                    on_progress(done, work)
    finally:
        for handle in handles:
            handle.remove()
    return total / max(1, len(prompts))


def _broadcast_cache(cache: Any, rows: int) -> Any:
    """The 1-row prefix cache for `rows` rows without copying it: each layer's keys/values are broadcast views
    (the step's torch.cat writes the only copy), where a deepcopy + repeat_interleave cost 15 % of a batch."""
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        out = copy.deepcopy(cache)  # a cache of another kind: copy it as before
        out.batch_repeat_interleave(rows)
        return out
    out = copy.copy(cache)
    out.layers = []
    for layer in layers:
        view = copy.copy(layer)
        if getattr(layer, "is_initialized", True) and layer.keys is not None and layer.keys.dim() == 4:
            view.keys = layer.keys.expand(rows, -1, -1, -1)
            view.values = layer.values.expand(rows, -1, -1, -1)
        out.layers.append(view)
    return out


def strength_at_kl(kl: torch.Tensor, strengths: Sequence[float] | torch.Tensor, target: float) -> torch.Tensor:
    """(F,) the strength where each row of `kl` (F, S) reaches `target`, interpolated in log-log between the
    measured strengths (a shared grid or one per row); NaN where a row never moves the distribution (a zero
    direction: nothing to recommend)."""
    log_s = strength_grid(strengths, kl.shape[0]).log()
    num = log_s.shape[1]
    log_kl = kl.double().clamp_min(1e-12).log()
    log_t = math.log(target)
    out = torch.full((kl.shape[0],), float("nan"), dtype=torch.float64)
    # Segment j joins points j and j+1; take the first segment whose right end reaches the target, else
    # the last one (extrapolate up), or the first one when even s_1 overshoots (extrapolate down).
    reached = log_kl >= log_t  # (F, S)
    first = torch.where(reached.any(1), reached.double().argmax(1).long(), torch.full_like(out, num - 1).long())
    seg = (first - 1).clamp(0, num - 2).unsqueeze(1)
    x0, x1 = log_s.gather(1, seg).squeeze(1), log_s.gather(1, seg + 1).squeeze(1)
    y0, y1 = log_kl.gather(1, seg).squeeze(1), log_kl.gather(1, seg + 1).squeeze(1)
    slope = (y1 - y0) / (x1 - x0)
    ok = (slope > 1e-3) & (kl.amax(1).double() > 1e-6)
    guess = x0 + (log_t - y0) / slope.where(ok, torch.ones_like(slope))
    bounded = torch.minimum(torch.maximum(guess, log_s[:, 0] - math.log(16.0)), log_s[:, -1] + math.log(16.0))
    out[ok] = bounded[ok].exp()
    return out.float()


def kl_at_strength(kl: torch.Tensor, strengths: Sequence[float] | torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """(F,) KL interpolated at each row's `strength` (F,), in log-log (the inverse of `strength_at_kl`)."""
    log_s = strength_grid(strengths, kl.shape[0]).log().contiguous()
    log_kl = kl.double().clamp_min(1e-12).log()
    x = strength.double().log().unsqueeze(1)
    seg = (torch.searchsorted(log_s, x) - 1).clamp(0, log_s.shape[1] - 2)
    x0, x1 = log_s.gather(1, seg).squeeze(1), log_s.gather(1, seg + 1).squeeze(1)
    y0, y1 = log_kl.gather(1, seg).squeeze(1), log_kl.gather(1, seg + 1).squeeze(1)
    return (y0 + (y1 - y0) * (x.squeeze(1) - x0) / (x1 - x0)).exp().float()


def with_points(grid: torch.Tensor, kl: torch.Tensor, strength: torch.Tensor, measured: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row grid and KL (F, S+1) with one more measured point per row (`strength`, `measured`, both (F,)),
    sorted by strength: a second pass at the first estimate makes the interpolation exact there."""
    # A new point on an existing one would make a zero-width segment: move it aside by 1 %.
    strength = strength.double()
    clash = (grid - strength.unsqueeze(1)).abs().le(1e-9 * grid).any(1)
    strength = torch.where(clash, strength * 1.01, strength)
    grid = torch.cat([grid, strength.unsqueeze(1)], 1)
    kl = torch.cat([kl, measured.unsqueeze(1)], 1)
    order = grid.argsort(1)
    return grid.gather(1, order), kl.gather(1, order)


def calibrate_from_kl(kl: torch.Tensor, strengths: Sequence[float] | torch.Tensor, *, target: float,
                      refined: dict[int, float] | None = None) -> dict[str, list[float | None]]:
    """Per-feature raw `recommended`, `low`, `high` (None where nothing to recommend) and the `source` of each
    recommendation: "sweep" where a generation sweep chose it (`refined`), "kl" otherwise."""
    recommended = strength_at_kl(kl, strengths, target)
    low = strength_at_kl(kl, strengths, target / RANGE_FACTOR)
    high = strength_at_kl(kl, strengths, target * RANGE_FACTOR)
    source = ["kl" if not math.isnan(float(v)) else None for v in recommended]
    for index, value in (refined or {}).items():
        recommended[index] = value
        low[index] = min(float(low[index]), value) if not math.isnan(float(low[index])) else value / 2
        high[index] = max(float(high[index]), value) if not math.isnan(float(high[index])) else value * 2
        source[index] = "sweep"

    def listed(values: torch.Tensor) -> list[float | None]:
        return [None if math.isnan(v) else round(v, 4) for v in values.tolist()]

    return {"recommended": listed(recommended), "low": listed(low), "high": listed(high), "source": source}
