"""Steering: what a request asks for (SteeringSpec), what the hot path needs (CompiledSteering),
and the batched per-row math on the residual stream (apply_steering).

Math (DESIGN "Steering math"), per token with residual h at the hooked layer:
- additive: h' = h + Σ_i s_i · W_dec[i]   (one precomputed d_in vector per spec)
- clamp:    h' = x̂' + e = h + Σ_i (v_i - f_i(h)) · W_dec[i]   (f_i := v_i, the SAE error e kept)

Spread over layers (additive only, `SteeringSpec.layers`): the same direction is added at each
listed decoder layer l, scaled to that layer's residual norm: h_l' = h_l + (n_l / n_L) · Σ_i s_i W_dec[i],
with n_l the median residual norm after block l and L the SAE's layer. Several layers at a fraction
of the strength move the text toward a concept with less damage than one layer at the full strength
(docs/steering.md, "What works on SmolLM2"). `engine/steering_layers.py` applies the other layers.

Direction (additive only, `SteeringSpec.direction`): "decoder" adds W_dec[i]; "concept" adds the
feature's concept direction c_i instead: the normalised mean of the normalised unembedding rows of the
tokens the feature fires on most (`concept_directions`). A residual-stream SAE's decoder row says
"this token is here", which makes a model continue after the token rather than write it; c_i says
"write this next", which is what turning a feature up is meant to do (docs/steering.md).

Everything a spec needs is computed once in `compile_steering`; everything a batch of rows needs is
stacked once in `batch_steering` (the hook caches it while the set of rows does not change), so a
forward step costs a few fused tensor ops: no Python loop over features, no host sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from engine.errors import InvalidFeatureIndexError, InvalidSteeringError
from engine.rules import (  # noqa: F401 - re-exported: the engine's callers name them here
    MAX_ABS_STRENGTH,
    MAX_STEERED_TOKENS,
    MAX_STEERING_LAYERS,
    STEERING_DIRECTIONS,
    STEERING_MODES,
    STEERING_POSITIONS,
    SteeringDirection,
    SteeringMode,
    SteeringPositions,
)
from engine.sae import SaeWeights


@dataclass(frozen=True)
class SteeringFeature:
    index: int
    strength: float  # additive: coefficient of W_dec[index]; clamp: the target activation v_i
    sae: str | None = None  # the attached SAE the index belongs to; None: the default (first attached) SAE


@dataclass(frozen=True)
class SteeringSpec:
    features: tuple[SteeringFeature, ...]
    mode: SteeringMode = "additive"
    # "generated_only": steer only positions whose *input* token was generated. At a decode step the
    # input is the previously generated token, so the first generated token (predicted from the last
    # prompt position) is unsteered; steering shows from the second generated token on.
    positions: SteeringPositions = "all"
    # Additive only: the decoder layers to add the direction at, each scaled to its residual norm
    # (see the module docstring). Empty: the SAE's own layer only.
    layers: tuple[int, ...] = ()
    # Additive only: "decoder" (W_dec[i]) or "concept" (the feature's concept direction, see above).
    direction: SteeringDirection = "decoder"
    # Steer only while producing the first N generated tokens; token N+1 on is produced unsteered (the cache
    # keeps what the steered passes wrote). None: the whole answer. With "generated_only" token 1 comes from
    # the prompt's unsteered pass, so N steers tokens 2..N.
    max_steered_tokens: int | None = None
    # Stop steering a row once it has generated one of the steered features' concept tokens (the tokens its
    # concept direction is built from; logit-lens top tokens for an SAE without them): the concept is said
    # once, then the model goes on by itself (docs/steering.md, "Until the concept is written").
    until_concept: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))  # accept a list, stay hashable
        object.__setattr__(self, "layers", tuple(self.layers))


def validate_steering(spec: SteeringSpec, *, d_sae: int, max_abs_strength: float = MAX_ABS_STRENGTH,
                      num_layers: int | None = None) -> None:
    """Raise InvalidFeatureIndexError / InvalidSteeringError unless the spec can be applied to this SAE."""
    if spec.layers:
        if spec.mode != "additive":
            raise InvalidSteeringError("steering layers apply to additive steering only")
        if len(set(spec.layers)) != len(spec.layers) or len(spec.layers) > MAX_STEERING_LAYERS:
            raise InvalidSteeringError(f"steering layers must be at most {MAX_STEERING_LAYERS} distinct layers")
        for layer in spec.layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0 or (
                    num_layers is not None and layer >= num_layers):
                bound = f"[0, {num_layers})" if num_layers is not None else "non-negative"
                raise InvalidSteeringError(f"steering layer {layer!r} must be an integer in {bound}")
    limit = spec.max_steered_tokens
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or not 1 <= limit <= MAX_STEERED_TOKENS):
        raise InvalidSteeringError(f"max_steered_tokens must be an integer in [1, {MAX_STEERED_TOKENS}], got {limit!r}")
    if not isinstance(spec.until_concept, bool):
        raise InvalidSteeringError(f"until_concept must be true or false, got {spec.until_concept!r}")
    if spec.direction not in STEERING_DIRECTIONS:
        raise InvalidSteeringError(
            f"steering direction must be one of {', '.join(STEERING_DIRECTIONS)}, got {spec.direction!r}"
        )
    if spec.direction != "decoder" and spec.mode != "additive":
        raise InvalidSteeringError("a concept direction applies to additive steering only")
    if spec.mode not in STEERING_MODES:
        raise InvalidSteeringError(
            f"steering mode must be one of {', '.join(STEERING_MODES)}, got {spec.mode!r}"
        )
    if spec.positions not in STEERING_POSITIONS:
        raise InvalidSteeringError(
            f"steering positions must be one of {', '.join(STEERING_POSITIONS)}, got {spec.positions!r}"
        )
    seen: set[int] = set()
    for feature in spec.features:
        index = feature.index
        if isinstance(index, bool) or not isinstance(index, int):
            raise InvalidFeatureIndexError(f"feature index must be an integer, got {index!r}")
        if not 0 <= index < d_sae:
            raise InvalidFeatureIndexError(f"feature index {index} is outside [0, {d_sae})")
        if index in seen:
            raise InvalidSteeringError(f"feature {index} is steered more than once")
        seen.add(index)
        strength = feature.strength
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength):
            raise InvalidSteeringError(
                f"strength of feature {index} must be a finite number, got {strength!r}"
            )
        if abs(strength) > max_abs_strength:
            raise InvalidSteeringError(
                f"strength {strength} of feature {index} exceeds the bound ±{max_abs_strength:g}"
            )


@dataclass(frozen=True, eq=False)  # eq=False: identity equality, so RowInfo tuples compare cheaply
class CompiledSteering:
    spec: SteeringSpec
    feature_indices: torch.Tensor  # (K,) long
    additive_delta: torch.Tensor | None = None  # additive: Σ s_i W_dec[i], (d_in,)
    # clamp (K = number of steered features):
    clamp_values: torch.Tensor | None = None  # (K,) targets v_i
    clamp_decoder_rows: torch.Tensor | None = None  # (K, d_in) W_dec[i]
    clamp_encoder_weight: torch.Tensor | None = None  # (d_in, K) W_enc[:, i] (relu/jumprelu)
    clamp_encoder_bias: torch.Tensor | None = None  # (K,) with b_dec folded in, see SaeWeights
    clamp_threshold: torch.Tensor | None = None  # (K,) jumprelu only
    # topk: whether feature i is active depends on all other features, so clamp encodes in full.
    full_encoder: SaeWeights | None = None
    # spread (spec.layers): the additive steering of each layer other than the SAE's, {layer: steering}
    other_layers: dict[int, CompiledSteering] | None = None
    # Several SAEs attached: the parts of the spec that address the other SAEs, {SAE name: steering},
    # each applied by that SAE's own hook at its layer (this object itself is the default SAE's part).
    saes: dict[str, CompiledSteering] | None = None
    # until_concept: a row stops being steered once it generates one of these (all SAEs' parts together).
    stop_token_ids: frozenset[int] = frozenset()

    @property
    def mode(self) -> SteeringMode:
        return self.spec.mode

    @property
    def max_steered_tokens(self) -> int | None:
        return self.spec.max_steered_tokens

    @property
    def positions(self) -> SteeringPositions:
        return self.spec.positions


def compile_steering(
    sae: SaeWeights, spec: SteeringSpec, *, max_abs_strength: float = MAX_ABS_STRENGTH,
    layer_norms: Sequence[float] | None = None, concept_directions: torch.Tensor | None = None,
    concept_tokens: torch.Tensor | None = None, unembedding: torch.Tensor | None = None,
) -> CompiledSteering:
    """Validate the spec and precompute its tensors (on the SAE's device and dtype).

    `layer_norms[l]`: median residual norm after decoder layer l, needed when the spec spreads
    over layers (the runtime measures them when the SAE is attached). `concept_directions`
    (d_sae, d_in): needed for direction "concept" (see `concept_direction_matrix`). For `until_concept`:
    `concept_tokens` (d_sae, k) the tokens those directions are built from, or else `unembedding`
    (vocab, d_in) to read each steered feature's top logit-lens tokens (`stop_tokens`).
    """
    validate_steering(spec, d_sae=sae.d_sae, max_abs_strength=max_abs_strength,
                      num_layers=len(layer_norms) if layer_norms is not None else None)
    compiled = _compile(sae, spec, max_abs_strength, layer_norms, concept_directions)
    if spec.until_concept and spec.features:
        compiled = replace(compiled, stop_token_ids=stop_tokens(sae, [f.index for f in spec.features],
                                                                concept_tokens=concept_tokens, unembedding=unembedding))
    return compiled


LOGIT_LENS_STOP_TOKENS = 3  # as many as the demo build's concept tokens per feature


def stop_tokens(sae: SaeWeights, indices: Sequence[int], *, concept_tokens: torch.Tensor | None = None,
                unembedding: torch.Tensor | None = None) -> frozenset[int]:
    """The token ids that end `until_concept` steering of these features: their concept tokens where the SAE has
    them (the demo build stores them beside the concept directions), else the top logit-lens tokens of each
    decoder row (W_dec[i] @ W_U^T: the tokens the feature's direction promotes most)."""
    if concept_tokens is not None:
        ids = concept_tokens[torch.tensor(list(indices), dtype=torch.long)].flatten()
        return frozenset(int(t) for t in ids.tolist() if t >= 0)
    if unembedding is None:
        raise InvalidSteeringError("until_concept needs the SAE's concept tokens or the model's unembedding")
    rows = sae.W_dec.index_select(0, torch.tensor(list(indices), dtype=torch.long, device=sae.device))
    logits = rows.float() @ unembedding.to(rows.device).float().T
    return frozenset(int(t) for t in logits.topk(LOGIT_LENS_STOP_TOKENS, dim=-1).indices.flatten().tolist())


def _compile(sae: SaeWeights, spec: SteeringSpec, max_abs_strength: float, layer_norms: Sequence[float] | None,
             concept_directions: torch.Tensor | None) -> CompiledSteering:
    if spec.layers:
        if layer_norms is None:
            raise InvalidSteeringError("steering over several layers needs the model's residual norms per layer")
        return _compile_spread(sae, spec, layer_norms, concept_directions)
    if spec.direction == "concept":
        if concept_directions is None:
            raise InvalidSteeringError("this SAE has no concept directions: steer along its decoder rows")
        sae = replace(sae, W_dec=concept_directions.to(device=sae.device, dtype=sae.dtype),
                      encoder_bias=sae.encoder_bias, decoder_row_norms=None)
    indices = torch.tensor([f.index for f in spec.features], dtype=torch.long, device=sae.device)
    strengths = torch.tensor(
        [float(f.strength) for f in spec.features], dtype=torch.float32, device=sae.device
    )
    decoder_rows = sae.W_dec.index_select(0, indices)
    if spec.mode == "additive":
        # Summed in float32 so a bf16 SAE does not lose the small terms.
        delta = (strengths @ decoder_rows.float()).to(sae.dtype)
        return CompiledSteering(spec=spec, feature_indices=indices, additive_delta=delta)
    if sae.architecture == "topk":
        return CompiledSteering(
            spec=spec,
            feature_indices=indices,
            clamp_values=strengths.to(sae.dtype),
            clamp_decoder_rows=decoder_rows,
            full_encoder=sae,
        )
    return CompiledSteering(
        spec=spec,
        feature_indices=indices,
        clamp_values=strengths.to(sae.dtype),
        clamp_decoder_rows=decoder_rows,
        clamp_encoder_weight=sae.W_enc.index_select(1, indices),
        clamp_encoder_bias=sae.encoder_bias.index_select(0, indices),
        clamp_threshold=sae.threshold.index_select(0, indices) if sae.threshold is not None else None,
    )


def _compile_spread(sae: SaeWeights, spec: SteeringSpec, layer_norms: Sequence[float],
                    concept_directions: torch.Tensor | None) -> CompiledSteering:
    single = replace(spec, layers=())
    base = _compile(sae, single, MAX_ABS_STRENGTH, None, concept_directions)  # Σ s_i W_dec[i] at layer L
    hook_norm = float(layer_norms[sae.hook_layer])

    def scaled(layer: int) -> torch.Tensor:
        return base.additive_delta * (float(layer_norms[layer]) / hook_norm)

    own = scaled(sae.hook_layer) if sae.hook_layer in spec.layers else torch.zeros_like(base.additive_delta)
    others = {layer: CompiledSteering(spec=single, feature_indices=base.feature_indices, additive_delta=scaled(layer))
              for layer in spec.layers if layer != sae.hook_layer}
    return CompiledSteering(spec=spec, feature_indices=base.feature_indices, additive_delta=own,
                            other_layers=others)


def concept_direction_matrix(unembedding: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """(d_sae, d_in) concept directions: per feature, the normalised mean of the normalised
    unembedding rows of its tokens. `unembedding` (vocab, d_in); `token_ids` (d_sae, k) long, -1 where
    a feature has fewer tokens. A feature without tokens (dead) gets a zero row: steering it adds nothing."""
    rows = torch.nn.functional.normalize(unembedding.float(), dim=-1)
    valid = (token_ids >= 0).unsqueeze(-1).float()  # (d_sae, k, 1)
    summed = (rows[token_ids.clamp_min(0)] * valid).sum(1)  # (d_sae, d_in)
    return torch.nn.functional.normalize(summed, dim=-1)  # a zero sum stays zero


@dataclass(frozen=True, eq=False)
class SteeringBatch:
    """The compiled steerings of one batch, stacked per row (built once per set of rows)."""

    steerings: tuple[CompiledSteering | None, ...]
    device: torch.device
    dtype: torch.dtype
    additive_deltas: torch.Tensor | None = None  # (B, 1, d_in), zero rows where not additive
    generated_only_rows: torch.Tensor | None = None  # (B,) bool; None when no row asks for it
    clamp_rows: torch.Tensor | None = None  # (Bc,) long, the rows in clamp mode
    clamp_covers_all_rows: bool = False
    # (Bc, ...) stacks padded to the largest K: padded columns have value 0 and a zero decoder row,
    # so they contribute (0 - f) · 0 = 0 without a mask.
    clamp_values: torch.Tensor | None = None  # (Bc, 1, K)
    clamp_decoder_rows: torch.Tensor | None = None  # (Bc, K, d_in)
    clamp_encoder_weight: torch.Tensor | None = None  # (Bc, d_in, K)
    clamp_encoder_bias: torch.Tensor | None = None  # (Bc, 1, K)
    clamp_threshold: torch.Tensor | None = None  # (Bc, 1, K); -inf for rows without one
    clamp_feature_indices: torch.Tensor | None = None  # (Bc, 1, K), topk only (gather from full f)
    full_encoder: SaeWeights | None = None

    @property
    def is_noop(self) -> bool:
        return self.additive_deltas is None and self.clamp_rows is None

    def matches(
        self, steerings: Sequence[CompiledSteering | None], device: torch.device, dtype: torch.dtype
    ) -> bool:
        """Same compiled objects (by identity) in the same rows, same device and dtype."""
        return (
            self.device == device
            and self.dtype == dtype
            and len(self.steerings) == len(steerings)
            and all(a is b for a, b in zip(self.steerings, steerings, strict=True))
        )


def batch_steering(
    steerings: Sequence[CompiledSteering | None], *, device: torch.device, dtype: torch.dtype
) -> SteeringBatch:
    """Stack per-row steerings into the tensors `apply_steering` uses (rows may share one object)."""
    steerings = tuple(steerings)
    for steering in steerings:
        if steering is not None and not isinstance(steering, CompiledSteering):
            raise TypeError(f"row steering must be a CompiledSteering or None, got {type(steering).__name__}")
    fields_: dict = {}

    def moved(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)

    # inference_mode(False): a batch built during generation must stay usable outside it too.
    with torch.inference_mode(False), torch.no_grad():
        additive = [s is not None and s.mode == "additive" for s in steerings]
        if any(additive):
            d_in = next(s.additive_delta.shape[0] for s, a in zip(steerings, additive, strict=True) if a)
            zero = torch.zeros(d_in, device=device, dtype=dtype)
            fields_["additive_deltas"] = torch.stack(
                [moved(s.additive_delta) if a else zero for s, a in zip(steerings, additive, strict=True)]
            ).unsqueeze(1)
        if any(s is not None and s.positions == "generated_only" for s in steerings):
            fields_["generated_only_rows"] = torch.tensor(
                [s is not None and s.positions == "generated_only" for s in steerings], device=device
            )
        clamp_rows = [i for i, s in enumerate(steerings) if s is not None and s.mode == "clamp"]
        if clamp_rows:
            fields_.update(_stack_clamp([steerings[i] for i in clamp_rows], moved))
            fields_["clamp_rows"] = torch.tensor(clamp_rows, dtype=torch.long, device=device)
            fields_["clamp_covers_all_rows"] = len(clamp_rows) == len(steerings)
            encoder = fields_.get("full_encoder")
            if encoder is not None:
                fields_["full_encoder"] = encoder.to(device=device)
    return SteeringBatch(steerings=steerings, device=torch.device(device), dtype=dtype, **fields_)


def _stack_clamp(clamps: list[CompiledSteering], moved: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    width = max(s.feature_indices.shape[0] for s in clamps)
    full_encoder = clamps[0].full_encoder
    if any((s.full_encoder is None) != (full_encoder is None) for s in clamps):
        raise InvalidSteeringError("clamp steerings compiled for different SAEs cannot share a batch")

    def padded(tensor: torch.Tensor, dim: int, fill: float = 0.0) -> torch.Tensor:
        missing = width - tensor.shape[dim]
        if missing == 0:
            return tensor
        shape = list(tensor.shape)
        shape[dim] = missing
        return torch.cat([tensor, torch.full(shape, fill, dtype=tensor.dtype, device=tensor.device)], dim=dim)

    stacked: dict = {
        "clamp_values": torch.stack([padded(moved(s.clamp_values), 0) for s in clamps]).unsqueeze(1),
        "clamp_decoder_rows": torch.stack([padded(moved(s.clamp_decoder_rows), 0) for s in clamps]),
    }
    if full_encoder is not None:
        stacked["full_encoder"] = full_encoder
        stacked["clamp_feature_indices"] = torch.stack(
            [padded(moved(s.feature_indices), 0) for s in clamps]
        ).unsqueeze(1)
        return stacked
    stacked["clamp_encoder_weight"] = torch.stack([padded(moved(s.clamp_encoder_weight), 1) for s in clamps])
    stacked["clamp_encoder_bias"] = torch.stack(
        [padded(moved(s.clamp_encoder_bias), 0) for s in clamps]
    ).unsqueeze(1)
    if any(s.clamp_threshold is not None for s in clamps):
        no_threshold = torch.full((width,), -math.inf)
        stacked["clamp_threshold"] = torch.stack(
            [
                padded(moved(s.clamp_threshold), 0) if s.clamp_threshold is not None else moved(no_threshold)
                for s in clamps
            ]
        ).unsqueeze(1)
    return stacked


def apply_steering(
    h: torch.Tensor,
    rows: SteeringBatch | Sequence[CompiledSteering | None],
    generated_mask: torch.Tensor | None = None,
    valid_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Steered residual h' (B, T, d) for per-row steerings; h itself is never modified.

    Masks are (B, T) bools. Without a valid mask every position counts as valid; without a
    generated mask no position counts as generated (so "generated_only" rows are left alone).
    Padding (valid False) is never steered.
    """
    batch = rows if isinstance(rows, SteeringBatch) else batch_steering(rows, device=h.device, dtype=h.dtype)
    if batch.is_noop:
        return h
    gate = _position_gate(batch, h, generated_mask, valid_mask)  # (B, T, 1) or None: every position
    steered = h
    if batch.additive_deltas is not None:
        deltas = batch.additive_deltas
        steered = h + deltas if gate is None else torch.addcmul(h, gate, deltas)
    if batch.clamp_rows is not None:
        clamp_h = h if batch.clamp_covers_all_rows else h.index_select(0, batch.clamp_rows)
        correction = _clamp_correction(batch, clamp_h)
        if gate is not None:
            correction = correction * (
                gate if batch.clamp_covers_all_rows else gate.index_select(0, batch.clamp_rows)
            )
        if batch.clamp_covers_all_rows:
            steered = steered + correction
        elif steered is h:
            steered = h.index_add(0, batch.clamp_rows, correction)
        else:
            steered.index_add_(0, batch.clamp_rows, correction)  # our own fresh tensor
    return steered


def _clamp_correction(batch: SteeringBatch, clamp_h: torch.Tensor) -> torch.Tensor:
    """Σ_i (v_i - f_i(h)) W_dec[i] for the clamp rows, (Bc, T, d)."""
    if batch.full_encoder is not None:
        full = batch.full_encoder.encode(clamp_h)
        steps = clamp_h.shape[1]
        index = batch.clamp_feature_indices.expand(-1, steps, -1)
        current = full.gather(-1, index).to(clamp_h.dtype)
    else:
        pre = torch.baddbmm(batch.clamp_encoder_bias, clamp_h, batch.clamp_encoder_weight)
        current = pre.relu()
        if batch.clamp_threshold is not None:
            current = current * (pre > batch.clamp_threshold).to(pre.dtype)
    return torch.bmm(batch.clamp_values - current, batch.clamp_decoder_rows)


def _position_gate(
    batch: SteeringBatch,
    h: torch.Tensor,
    generated_mask: torch.Tensor | None,
    valid_mask: torch.Tensor | None,
) -> torch.Tensor | None:
    if valid_mask is None and batch.generated_only_rows is None:
        return None
    allowed = (
        valid_mask if valid_mask is not None else torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
    )
    if batch.generated_only_rows is not None:
        generated = generated_mask if generated_mask is not None else torch.zeros_like(allowed)
        allowed = allowed & (generated | ~batch.generated_only_rows.unsqueeze(1))
    return allowed.unsqueeze(-1).to(h.dtype)
