"""Conditional steering and abort: steered features that apply only on tokens where another feature's
activation holds a condition, and conditions that stop a generation (Goodfire's `set_when`/`abort_when`).

Math, per row b and input position t, with h the residual at the SAE's layer *before* any steering (what
the model itself represents there) and f_j(h) the SAE's activation of feature j:
- condition c = (j, lo, hi): holds[b, t, c] = lo_c < f_j(h[b, t]) < hi_c   (`above` = lo, `below` = hi;
  a missing bound is ∓inf)
- conditional steering: h'[b, t] = h_steered[b, t] + gate[b, t] · Σ_c holds[b, t, c] · s_c · W_dec[i_c]
  (gate: valid positions, and generated ones only for positions="generated_only"); additive only.
- abort: a row finishes at the first *generated* input position where any of its abort conditions holds
  (the token where it holds has been emitted; the one sampled from it is not). Prompt positions are not
  checked, and the last generated token, never an input, cannot abort.

Several SAEs (a feature addressed as (SAE, index); `sae` None is the default, first attached SAE): a
conditional feature is steered at its own SAE's layer L_A; its condition reads SAE B at layer L_B:
- L_B <= L_A: the current token. Same layer: the residual that reaches SAE A's hook (before its steering);
  an earlier layer: the residual SAE B's hook saw in this same forward pass, before B's steering.
- L_B > L_A: the previous token (a one-step lag): layer L_B of the current token is computed after L_A,
  so the condition reads the value L_B had at the input token before. Such a condition holds only on
  generated input positions (at a prompt position the previous token's value at L_B is not kept); the
  first generated input reads the prompt's last position.
Abort conditions are checked by the hook of the SAE they read, at the current token.
Each steered SAE's part of a row's conditions is compiled separately (`CompiledConditions.saes`).

All rows' conditions
are stacked once per set of rows (`batch_conditions`, padded: a padded column never holds and has a zero
vector), so a forward pass costs one (B, T, d_in) x (B, d_in, K) product, a comparison and one bmm: no
Python loop over features or tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from engine.errors import InvalidFeatureIndexError, InvalidSteeringError, SaeNotAttachedError
from engine.rules import MAX_ABS_STRENGTH
from engine.sae import SaeWeights

MAX_CONDITIONS = 64


@dataclass(frozen=True)
class FeatureCondition:
    index: int  # the feature whose activation is read
    above: float | None = None  # holds where f > above
    below: float | None = None  # holds where f < below
    sae: str | None = None  # the attached SAE the feature belongs to; None: the default SAE


@dataclass(frozen=True)
class ConditionalFeature:
    index: int
    strength: float  # coefficient of W_dec[index] where the condition holds
    when: FeatureCondition
    sae: str | None = None  # the SAE steered (its layer, its decoder row); None: the default SAE


@dataclass(frozen=True)
class SteeringConditions:
    features: tuple[ConditionalFeature, ...] = ()
    abort_when: tuple[FeatureCondition, ...] = ()
    positions: str = "all"  # the steering's positions ("generated_only" gates the conditional deltas too)

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "abort_when", tuple(self.abort_when))

    def __bool__(self) -> bool:
        return bool(self.features or self.abort_when)


@dataclass(frozen=True)
class SteeringAbort:
    """What ended a row: the abort condition's feature and its value at the input token (a capture entry)."""

    index: int
    value: float
    sae: str | None = None  # the SAE of the feature (None: the default SAE)


def _check_index(index: object, d_sae: int, what: str) -> None:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < d_sae:
        raise InvalidFeatureIndexError(f"{what}: feature index {index!r} is outside [0, {d_sae})")


def _check_condition(condition: FeatureCondition, d_sae: int, what: str) -> None:
    _check_index(condition.index, d_sae, what)
    if condition.above is None and condition.below is None:
        raise InvalidSteeringError(f"{what}: a condition needs `above` or `below`")
    for name in ("above", "below"):
        value = getattr(condition, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value)):
            raise InvalidSteeringError(f"{what}: `{name}` must be a finite number, got {value!r}")


def validate_conditions(conditions: SteeringConditions, *, d_sae: int, mode: str = "additive",
                        max_abs_strength: float = MAX_ABS_STRENGTH) -> None:
    """Raise InvalidFeatureIndexError / InvalidSteeringError unless the conditions fit this SAE."""
    if conditions.features and mode != "additive":
        raise InvalidSteeringError("conditional features (`when`) apply to additive steering only")
    if len(conditions.features) > MAX_CONDITIONS or len(conditions.abort_when) > MAX_CONDITIONS:
        raise InvalidSteeringError(f"at most {MAX_CONDITIONS} conditional features and {MAX_CONDITIONS} abort conditions")
    for feature in conditions.features:
        _check_index(feature.index, d_sae, "steered feature")
        strength = feature.strength
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength) \
                or abs(strength) > max_abs_strength:
            raise InvalidSteeringError(
                f"strength of feature {feature.index} must be a finite number within ±{max_abs_strength:g}")
        _check_condition(feature.when, d_sae, f"feature {feature.index} when")
    for condition in conditions.abort_when:
        _check_condition(condition, d_sae, "abort_when")


@dataclass(frozen=True, eq=False)  # identity equality: RowInfo tuples compare cheaply
class CompiledConditions:
    conditions: SteeringConditions
    read_indices: torch.Tensor  # (K,) long: the condition features, conditional ones first, then abort ones
    encoder_weight: torch.Tensor  # (d_in, K) W_enc[:, j]
    encoder_bias: torch.Tensor  # (K,) with b_dec folded in
    jump_threshold: torch.Tensor  # (K,) jumprelu threshold, -inf otherwise
    lower: torch.Tensor  # (K,) `above`, -inf when absent
    upper: torch.Tensor  # (K,) `below`, +inf when absent
    vectors: torch.Tensor  # (Kc, d_in) s_c W_dec[i_c] of the conditional features
    full_encoder: SaeWeights | None  # topk: f_j depends on every feature, so the SAE encodes in full
    # Where each column's residual comes from (see the module docstring): HERE, (EARLIER, layer) or (LAG, layer).
    sources: tuple[tuple, ...] = ()
    abort_sae: str | None = None  # the SAE the abort columns read (reported in SteeringAbort)
    # Several SAEs: the parts steered or aborted at the other SAEs' hooks, {SAE name: conditions}.
    saes: dict[str, CompiledConditions] | None = None

    @property
    def steering_columns(self) -> int:
        return self.vectors.shape[0]

    @property
    def abort_columns(self) -> int:
        return len(self.conditions.abort_when)

    @property
    def is_empty(self) -> bool:  # a part with no columns: it only carries other SAEs' parts
        return not self.conditions

    def part(self, sae: str | None) -> CompiledConditions | None:
        """The columns one hook runs: None the default SAE's, a name that SAE's (None when it has none)."""
        part = self if sae is None else (self.saes or {}).get(sae)
        return None if part is None or part.is_empty else part


HERE = ("here",)
EARLIER, LAG = "earlier", "lag"


def compile_conditions(sae: SaeWeights, conditions: SteeringConditions, *, mode: str = "additive") -> CompiledConditions | None:
    """Validate and precompute (on the SAE's device and dtype); None when there is nothing conditional."""
    validate_conditions(conditions, d_sae=sae.d_sae, mode=mode)
    if not conditions:
        return None
    reads = [f.when for f in conditions.features] + list(conditions.abort_when)
    return _compile_part(sae, conditions, [sae] * len(reads), [HERE] * len(reads))


def compile_conditions_multi(saes: dict[str, SaeWeights], default: str, conditions: SteeringConditions, *,
                             mode: str = "additive", concept_directions: dict[str, torch.Tensor | None] | None = None,
                             ) -> CompiledConditions | None:
    """Conditions over several attached SAEs (`saes` in attach order, `default` the first): the default
    SAE's part, with the parts the other SAEs' hooks apply in `.saes`. Raises SaeNotAttachedError for a
    name not attached and InvalidFeatureIndexError for an index outside that SAE. `concept_directions` (per SAE
    name): steer each conditional feature along its concept direction instead of its decoder row."""
    def sae_of(name: str | None, what: str) -> tuple[str, SaeWeights]:
        name = default if name is None else name
        if name not in saes:
            raise SaeNotAttachedError(f"{what}: SAE {name!r} is not attached (attached: {', '.join(saes) or 'none'})")
        return name, saes[name]

    if conditions.features and mode != "additive":
        raise InvalidSteeringError("conditional features (`when`) apply to additive steering only")
    if len(conditions.features) > MAX_CONDITIONS or len(conditions.abort_when) > MAX_CONDITIONS:
        raise InvalidSteeringError(f"at most {MAX_CONDITIONS} conditional features and {MAX_CONDITIONS} abort conditions")
    parts: dict[str, tuple[list[ConditionalFeature], list[SaeWeights], list[tuple], list[FeatureCondition]]] = {}
    for feature in conditions.features:
        name, steered = sae_of(feature.sae, f"feature {feature.index}")
        reader_name, reader = sae_of(feature.when.sae, f"feature {feature.index} when")
        validate_conditions(SteeringConditions(features=(replace(feature, when=replace(feature.when, index=0)),)),
                            d_sae=steered.d_sae)
        _check_condition(feature.when, reader.d_sae, f"feature {feature.index} when (SAE {reader_name})")
        if reader.d_in != steered.d_in:
            raise InvalidSteeringError(f"feature {feature.index} when: SAE {reader_name} reads a residual of "
                                       f"width {reader.d_in}, SAE {name} one of {steered.d_in}")
        layer, own = reader.hook_layer, steered.hook_layer
        source = HERE if layer == own else (EARLIER, layer) if layer < own else (LAG, layer)
        features, readers, sources, _ = parts.setdefault(name, ([], [], [], []))
        features.append(feature)
        readers.append(reader)
        sources.append(source)
    for condition in conditions.abort_when:
        name, reader = sae_of(condition.sae, "abort_when")
        _check_condition(condition, reader.d_sae, f"abort_when (SAE {name})")
        parts.setdefault(name, ([], [], [], []))[3].append(condition)
    if not parts:
        return None
    compiled: dict[str, CompiledConditions] = {}
    for name, (features, readers, sources, aborts) in parts.items():
        part = SteeringConditions(features=tuple(features), abort_when=tuple(aborts), positions=conditions.positions)
        # The abort report names the SAE only where there is a choice (a single SAE's report stays as it was).
        rows = None
        if concept_directions is not None and features:
            rows = concept_directions.get(name)
            if rows is None:
                raise InvalidSteeringError(f"SAE {name}: this SAE has no concept directions: steer along its "
                                           "decoder rows")
        compiled[name] = _compile_part(saes[name], part, readers + [saes[name]] * len(aborts),
                                       sources + [HERE] * len(aborts), abort_sae=name if len(saes) > 1 else None,
                                       steer_rows=rows)
    top = compiled.pop(default, None)
    if top is None:  # nothing at the default SAE's hook: an empty part that only carries the others
        top = _compile_part(saes[default], SteeringConditions(positions=conditions.positions), [], [])
    return replace(top, saes=compiled) if compiled else top


def _compile_part(sae: SaeWeights, conditions: SteeringConditions, readers: list[SaeWeights], sources: list[tuple],
                  *, abort_sae: str | None = None, steer_rows: torch.Tensor | None = None) -> CompiledConditions:
    """One hook's columns: `readers[c]` is the SAE column c reads (its encoder), `sources[c]` where from;
    the conditional vectors are rows of `steer_rows` (the SAE's concept directions) or else of `sae.W_dec`,
    the hook's own SAE's decoder."""
    reads = [f.when for f in conditions.features] + list(conditions.abort_when)
    device, dtype = sae.device, sae.dtype
    topk = [r for r in readers if r.architecture == "topk"]
    if topk and (any(r is not sae for r in readers) or any(s != HERE for s in sources)):
        raise InvalidSteeringError("a condition on a top-k SAE must read the steered SAE's own features")
    indices = torch.tensor([c.index for c in reads], dtype=torch.long, device=device)

    def bound(values: list[float | None], missing: float) -> torch.Tensor:
        return torch.tensor([missing if v is None else float(v) for v in values], dtype=torch.float32, device=device)

    strengths = torch.tensor([float(f.strength) for f in conditions.features], dtype=torch.float32, device=device)
    steered = torch.tensor([f.index for f in conditions.features], dtype=torch.long, device=device)
    rows = sae.W_dec if steer_rows is None else steer_rows.to(device=device)
    vectors = (strengths.unsqueeze(1) * rows.index_select(0, steered).float()).to(dtype)

    def column(reader: SaeWeights, c: FeatureCondition, name: str) -> torch.Tensor:
        if name == "threshold":
            value = (reader.threshold[c.index] if reader.threshold is not None
                     else torch.tensor(-math.inf, device=reader.device, dtype=reader.dtype))
        elif name == "weight":
            value = reader.W_enc[:, c.index]
        else:
            value = reader.encoder_bias[c.index]
        return value.to(device=device, dtype=dtype)

    def stacked(name: str, empty: tuple[int, ...]) -> torch.Tensor:
        if not reads:
            return torch.zeros(empty, device=device, dtype=dtype)
        return torch.stack([column(r, c, name) for r, c in zip(readers, reads, strict=True)], dim=-1)

    return CompiledConditions(
        conditions=conditions, read_indices=indices,
        encoder_weight=stacked("weight", (sae.d_in, 0)), encoder_bias=stacked("bias", (0,)),
        jump_threshold=stacked("threshold", (0,)), lower=bound([c.above for c in reads], -math.inf),
        upper=bound([c.below for c in reads], math.inf), vectors=vectors,
        full_encoder=sae if topk else None, sources=tuple(sources), abort_sae=abort_sae)


@dataclass(frozen=True, eq=False)
class ConditionBatch:
    """The compiled conditions of one batch, stacked per row and padded (built once per set of rows)."""

    conditions: tuple[CompiledConditions | None, ...]
    device: torch.device
    dtype: torch.dtype
    steering_width: int  # Kc: padded conditional-steering columns (first)
    encoder_weight: torch.Tensor  # (B, d_in, K)
    encoder_bias: torch.Tensor  # (B, 1, K)
    jump_threshold: torch.Tensor  # (B, 1, K)
    lower: torch.Tensor  # (B, 1, K); +inf in padded columns, so they never hold
    upper: torch.Tensor  # (B, 1, K)
    vectors: torch.Tensor | None  # (B, Kc, d_in); None when no row steers conditionally
    generated_only_rows: torch.Tensor  # (B,) bool
    abort_rows: bool  # some row has abort conditions (the columns after Kc)
    read_indices: torch.Tensor | None  # (B, 1, K) long, topk only: gather from the full encoding
    full_encoder: SaeWeights | None
    # Where the columns read (HERE first); `source_of` (B, 1, K): each column's index in `sources`.
    sources: tuple[tuple, ...] = (HERE,)
    source_of: torch.Tensor | None = None  # None: every column reads HERE

    def matches(self, conditions: Sequence[CompiledConditions | None], device: torch.device, dtype: torch.dtype) -> bool:
        return (self.device == device and self.dtype == dtype and len(self.conditions) == len(conditions)
                and all(a is b for a, b in zip(self.conditions, conditions, strict=True)))


def batch_conditions(conditions: Sequence[CompiledConditions | None], *, device: torch.device,
                     dtype: torch.dtype) -> ConditionBatch | None:
    """Stack the rows' conditions (None when no row has any): conditional columns first, abort ones after."""
    conditions = tuple(conditions)
    present = [c for c in conditions if c is not None]
    if not present:
        return None
    kc = max(c.steering_columns for c in present)
    ka = max(c.abort_columns for c in present)
    d_in = present[0].encoder_weight.shape[0]
    full_encoder = present[0].full_encoder
    with torch.inference_mode(False), torch.no_grad():
        def columns(c: CompiledConditions | None, name: str, fill: float) -> torch.Tensor:
            out = torch.full((kc + ka,), fill, dtype=torch.float32, device=device)
            if c is not None:
                values = getattr(c, name).to(device=device, dtype=torch.float32)
                out[: c.steering_columns] = values[: c.steering_columns]
                out[kc: kc + c.abort_columns] = values[c.steering_columns:]
            return out

        weight = torch.zeros((len(conditions), d_in, kc + ka), dtype=dtype, device=device)
        read = torch.zeros((len(conditions), kc + ka), dtype=torch.long, device=device)
        sources = [HERE] + sorted({s for c in present for s in c.sources if s != HERE})
        source_of = torch.zeros((len(conditions), kc + ka), dtype=torch.long, device=device)
        vectors = torch.zeros((len(conditions), kc, d_in), dtype=dtype, device=device) if kc else None
        for b, c in enumerate(conditions):  # once per set of rows, not per step
            if c is None:
                continue
            w = c.encoder_weight.to(device=device, dtype=dtype)
            weight[b, :, : c.steering_columns] = w[:, : c.steering_columns]
            weight[b, :, kc: kc + c.abort_columns] = w[:, c.steering_columns:]
            read[b, : c.steering_columns] = c.read_indices[: c.steering_columns]
            read[b, kc: kc + c.abort_columns] = c.read_indices[c.steering_columns:]
            if len(sources) > 1:
                where = torch.tensor([sources.index(s) for s in c.sources], dtype=torch.long, device=device)
                source_of[b, : c.steering_columns] = where[: c.steering_columns]
                source_of[b, kc: kc + c.abort_columns] = where[c.steering_columns:]
            if vectors is not None and c.steering_columns:
                vectors[b, : c.steering_columns] = c.vectors.to(device=device, dtype=dtype)
        stack = lambda name, fill: torch.stack([columns(c, name, fill) for c in conditions]).unsqueeze(1)  # noqa: E731
        return ConditionBatch(
            conditions=conditions, device=torch.device(device), dtype=dtype, steering_width=kc,
            encoder_weight=weight, encoder_bias=stack("encoder_bias", 0.0).to(dtype),
            jump_threshold=stack("jump_threshold", -math.inf), lower=stack("lower", math.inf),
            upper=stack("upper", math.inf), vectors=vectors,
            generated_only_rows=torch.tensor([c is not None and c.conditions.positions == "generated_only"
                                              for c in conditions], device=device),
            abort_rows=ka > 0, read_indices=read.unsqueeze(1) if full_encoder is not None else None,
            full_encoder=full_encoder.to(device=device) if full_encoder is not None else None,
            sources=tuple(sources), source_of=source_of.unsqueeze(1) if len(sources) > 1 else None)


@dataclass(frozen=True, eq=False)
class PendingAborts:
    """Per row, at the pass's last position: which abort columns hold, and the values read."""

    holds: torch.Tensor  # (B, Ka) bool
    values: torch.Tensor  # (B, Ka)


# A source's residual for this pass and where it can be read: (residual (B, T, d), readable (B, T) bool or
# None: everywhere), or None when it cannot be read at all (its columns do not hold).
ResidualSource = Callable[[tuple], "tuple[torch.Tensor, torch.Tensor | None] | None"]


def apply_conditions(h: torch.Tensor, steered: torch.Tensor, batch: ConditionBatch,
                     generated_mask: torch.Tensor, valid_mask: torch.Tensor,
                     residual_of: ResidualSource | None = None) -> tuple[torch.Tensor, PendingAborts | None]:
    """(h' = steered + the conditional deltas, the abort checks) for a (B, T, d) residual h before steering.
    `residual_of` gives the residuals of the columns that read elsewhere (another layer, the previous token)."""
    if batch.full_encoder is not None:
        steps = h.shape[1]
        values = batch.full_encoder.encode(h).gather(-1, batch.read_indices.expand(-1, steps, -1)).float()
    else:
        values = _values(h, batch)
    holds = (values > batch.lower) & (values < batch.upper)  # (B, T, K)
    if batch.source_of is not None:
        for s, source in enumerate(batch.sources[1:], start=1):  # a few sources at most, not features
            column = batch.source_of == s  # (B, 1, K)
            read = residual_of(source) if residual_of is not None else None
            if read is None:
                holds = holds & ~column
                continue
            residual, readable = read
            other = _values(residual, batch)
            ok = (other > batch.lower) & (other < batch.upper)
            if readable is not None:
                ok = ok & readable.unsqueeze(-1)
            values = torch.where(column, other, values)
            holds = torch.where(column, ok, holds)
    kc = batch.steering_width
    if batch.vectors is not None:
        allowed = valid_mask & (generated_mask | ~batch.generated_only_rows.unsqueeze(1))  # (B, T)
        gate = (holds[..., :kc] & allowed.unsqueeze(-1)).to(steered.dtype)
        steered = steered + torch.bmm(gate, batch.vectors.to(steered.dtype))
    aborts = None
    if batch.abort_rows:
        last = (valid_mask[:, -1] & generated_mask[:, -1]).unsqueeze(-1)  # (B, 1): a generated input token
        aborts = PendingAborts(holds=holds[:, -1, kc:] & last, values=values[:, -1, kc:])
    return steered, aborts


def _values(h: torch.Tensor, batch: ConditionBatch) -> torch.Tensor:
    pre = torch.baddbmm(batch.encoder_bias, h.to(batch.dtype), batch.encoder_weight).float()
    return pre.relu() * (pre > batch.jump_threshold)


def collect_aborts(pending: PendingAborts, request_ids: Sequence[str],
                   conditions: Sequence[CompiledConditions | None]) -> dict[str, SteeringAbort]:
    """Rows whose abort held at this pass's input token (one host transfer), with the first condition that held."""
    holds = pending.holds.cpu().tolist()
    values = pending.values.cpu().tolist()
    aborts = {}
    for row, request_id in enumerate(request_ids):
        compiled = conditions[row]
        for column, held in enumerate(holds[row]):
            if held and compiled is not None and column < compiled.abort_columns:
                aborts[request_id] = SteeringAbort(index=compiled.conditions.abort_when[column].index,
                                                   value=round(values[row][column], 4), sae=compiled.abort_sae)
                break
    return aborts
