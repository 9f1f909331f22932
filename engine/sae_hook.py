"""The SAE on the model's residual stream: a forward hook that steers each batch row and captures
features for the monitored rows (a ForwardInterceptor, see protocols.py).

Per forward pass, at the output of decoder layer L (the SAE's hook layer):
1. capture: for rows with monitor=True and rows whose request asks for its features (RowInfo.features,
   engine/request_features.py), f = encode(h) once per residual read; per token the top-k features
   (k = the largest any row needs) and the values of the explicitly monitored or requested features
   are kept as tensors, and the running statistics are updated (monitored rows, valid positions
   only). Monitoring reads h *before* steering by default: what the model itself represents there
   (`capture_after_steering=True` shows the steered residual instead); a request chooses its own
   (`after_steering`), so one pass may encode twice: before steering and after.
2. steering: each row's CompiledSteering (or none), batched by `apply_steering`, then each row's
   conditional features and abort checks (engine/steering_conditions.py), read from h before steering;
   a row whose abort condition held gets a SteeringAbort among its captures.
Lists for the caller are built once per pass, in `collect()`, after the forward pass.
3. timing: each stage's wall time per pass goes to the `millm_sae_hook_seconds` histogram
   (engine/hook_timing.py; `time_stages=False` turns it off).

The stacked per-row tensors are cached while the batch's rows (request, steering object, monitor
flag) stay the same, which is every decode step between a request joining and one leaving.

Several SAEs attached (`SaeHooks`, one ForwardInterceptor for all of them): each SAE has its own hook at
its own layer. The first attached (the default, `part` None) steers each row's CompiledSteering itself and
captures the monitored features and requested features; another SAE's hook (`part` its name) steers the row's
part for it (`CompiledSteering.saes[name]`, `CompiledConditions.saes[name]`), feeds its own statistics, and
captures its own top-k for the monitored rows (their frames name it) and for requests naming it.
The hooks share a `ResidualBoard`: each leaves the residual it saw before steering, so a condition at a
later layer reads an earlier SAE's residual of the same pass, and one at an earlier layer the previous
token's (engine/steering_conditions.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.errors import SaeNotAttachedError
from engine.feature_stats import FeatureStatistics
from engine.hook_timing import StageTimer
from engine.interceptors import ForwardContext, RowInfo
from engine.sae import SaeWeights, decoder_layers, validate_sae_for_model
from engine.steering import (
    CompiledSteering,
    InvalidFeatureIndexError,
    SteeringBatch,
    SteeringSpec,
    apply_steering,
    batch_steering,
    compile_steering,
)
from engine.steering_conditions import (
    EARLIER,
    LAG,
    CompiledConditions,
    ConditionBatch,
    PendingAborts,
    SteeringAbort,
    apply_conditions,
    batch_conditions,
    collect_aborts,
)

DEFAULT_TOP_K = 10


@dataclass(frozen=True)
class FeatureCapture:
    """What one monitored row produced in one forward pass, for its valid input positions only."""

    input_positions: list[int]  # column of each captured token in this pass's input (0..T-1)
    generated: list[bool]  # per captured token: was its input token generated (not prompt)
    topk_indices: list[list[int]]  # per token, feature indices by decreasing activation
    topk_values: list[list[float]]
    monitored: dict[int, list[float]]  # monitored or requested feature -> its value at each captured token
    steered: bool = False  # read after steering (the steered residual) rather than before
    sae: str | None = None  # the SAE read when it is not the default one (a request's `return_features.sae`)


@dataclass(frozen=True, eq=False)
class _CaptureGroup:
    """The rows one residual read (before or after steering) encodes, and what they need of it."""

    rows: torch.Tensor  # (Bc,) long
    covers_all_rows: bool
    request_ids: tuple[str, ...]
    top_k: int  # the largest k any of these rows needs (each row's own k is cut in the frame builders)
    features: tuple[int, ...]  # union of the monitored and the requested features
    feature_index: torch.Tensor | None  # (F,) long
    statistics_rows: torch.Tensor | None  # (Bc, 1) bool: the monitored rows; None: none (no statistics)
    steered: bool
    sae: str | None = None  # the hook's `part`: captures of another SAE are tagged with its name


@dataclass(frozen=True, eq=False)
class _BatchPlan:
    rows: tuple[RowInfo, ...]
    steering: SteeringBatch
    capture_before: _CaptureGroup | None  # rows read before steering; None when none
    capture_after: _CaptureGroup | None  # rows read after steering
    monitoring: tuple  # (top_k, capture_after_steering, monitored features) the groups were built for
    conditions: ConditionBatch | None = None  # conditional steering and abort checks; None when no row has any


@dataclass(frozen=True, eq=False)
class _PendingCapture:
    group: _CaptureGroup
    request_ids: tuple[str, ...]
    topk_indices: torch.Tensor  # (Bm, T, k)
    topk_values: torch.Tensor  # (Bm, T, k)
    monitored_values: torch.Tensor | None  # (Bm, T, M)
    valid: torch.Tensor  # (Bm, T) bool
    generated: torch.Tensor  # (Bm, T) bool


class ResidualBoard:
    """The residuals the SAE hooks saw in this forward pass (before steering), per layer, and each
    request's last one per layer that a lagged condition reads (keyed by request: a row may sit out passes)."""

    KEEP = 4096  # requests remembered per layer before the ones not in the batch are dropped

    def __init__(self) -> None:
        self.current: dict[int, torch.Tensor] = {}
        self.last: dict[int, dict[str, torch.Tensor]] = {}
        # Steady decoding (the same rows as the pass before): each lag layer's last position, (B, 1, d) as is.
        self.aligned: dict[int, torch.Tensor] = {}
        self.lag_layers: set[int] = set()  # layers some row's condition reads one token late
        self._rows: tuple[str, ...] = ()

    def begin(self, context: ForwardContext | None) -> None:
        rows = tuple(r.request_id for r in context.rows) if context is not None else ()
        self.aligned = {}
        for layer in self.lag_layers & self.current.keys():
            last = self.current[layer][:, -1:]
            if rows == self._rows:  # no Python work per row while the batch stays the same
                self.aligned[layer] = last
                continue
            store = self.last.setdefault(layer, {})
            # The rows change: remember each one's latest value (a row sitting out a pass keeps its own).
            for b, request_id in enumerate(self._rows):  # rows of one batch, not features or tokens
                store[request_id] = last[b, 0]
            if len(store) > self.KEEP:
                self.last[layer] = {k: v for k, v in store.items() if k in set(rows)}
        self.current = {}
        self._rows = rows

    def stash(self, layer: int, hidden: torch.Tensor) -> None:
        self.current.setdefault(layer, hidden)  # the first hook on a layer: before any SAE steers it

    def residual(self, source: tuple, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        kind, layer = source
        if kind == EARLIER:
            earlier = self.current.get(layer)
            return (earlier, None) if earlier is not None and earlier.shape == hidden.shape else None
        if kind != LAG or hidden.shape[1] != 1:  # a prompt pass: no previous token's value at that layer
            return None
        aligned = self.aligned.get(layer)
        if aligned is not None and aligned.shape == hidden.shape:
            return aligned, None
        store = self.last.get(layer, {})
        zero = torch.zeros(hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        rows = [store.get(request_id) for request_id in self._rows]
        if len(rows) != hidden.shape[0] or all(r is None for r in rows):
            return None
        readable = torch.tensor([[r is not None] for r in rows], device=hidden.device)
        return torch.stack([zero if r is None else r.to(hidden.dtype) for r in rows]).unsqueeze(1), readable


class SaeHook:
    def __init__(
        self,
        *,
        top_k: int = DEFAULT_TOP_K,
        capture_after_steering: bool = False,
        collect_statistics: bool = True,
        time_stages: bool = True,
        board: ResidualBoard | None = None,
    ) -> None:
        # None: the default SAE's hook; an SAE name: another attached SAE's (steers its part only, see above).
        self.part: str | None = None
        self.board = board
        self.top_k = top_k
        self.time_stages = time_stages
        self._timer: StageTimer | None = None  # set while attached (its labels name the hooked layer)
        self.capture_after_steering = capture_after_steering
        self.collect_statistics = collect_statistics
        self.sae: SaeWeights | None = None  # on the hooked layer's device and dtype
        self.statistics: FeatureStatistics | None = None
        self.monitored_features: tuple[int, ...] = ()
        self._monitored_index: torch.Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._context: ForwardContext | None = None
        self._default_steering: CompiledSteering | None = None
        self._default_batch: SteeringBatch | None = None
        self._plan: _BatchPlan | None = None
        self._pending: list[_PendingCapture] = []
        self._pending_aborts: tuple[PendingAborts, _BatchPlan] | None = None

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def attach(
        self, model: torch.nn.Module, sae: SaeWeights, *, dtype: torch.dtype | None = None
    ) -> SaeWeights:
        """Hook the SAE onto the output of its layer; returns the SAE copy the hook runs (compile against it).

        Validation happens first, so a refused SAE leaves any previous attachment as it was. The SAE
        moves to the hooked layer's device and, unless `dtype` says otherwise, the model's dtype.
        Steering, monitored features and statistics belong to one SAE and are reset.
        """
        validate_sae_for_model(sae, model)
        layer = decoder_layers(model)[sae.hook_layer]
        parameter = next(layer.parameters(), None)
        device = parameter.device if parameter is not None else sae.device
        if dtype is None:
            dtype = getattr(model, "dtype", None)
        if dtype is None or not dtype.is_floating_point:  # e.g. a quantized checkpoint's storage dtype
            dtype = sae.dtype
        on_device = sae.to(device=device, dtype=dtype)
        self.detach()
        self.sae = on_device
        self.statistics = FeatureStatistics(on_device.d_sae, device=device)
        self._timer = StageTimer(sae.hook_layer) if self.time_stages else None
        self._handle = layer.register_forward_hook(self._on_layer_output)
        return on_device

    def detach(self) -> None:
        """Remove the hook; the model computes exactly what it did before attach."""
        if self._handle is not None:
            self._handle.remove()
        self._handle = None
        self._timer = None
        self.sae = None
        self.statistics = None
        self.monitored_features = ()
        self._monitored_index = None
        self._context = None
        self._default_steering = None
        self._default_batch = None
        self._plan = None
        self._pending = []

    def compile(self, spec: SteeringSpec) -> CompiledSteering:
        """compile_steering against the attached SAE (on the model's device and dtype)."""
        return compile_steering(self._require_sae(), spec)

    def set_part(self, part: str | None) -> None:
        """Make this the default SAE's hook (None) or another SAE's (its name)."""
        self.part = part
        self._plan = None
        self._default_batch = None

    def _steering_of(self, steering: CompiledSteering | None) -> CompiledSteering | None:
        if steering is None or self.part is None:
            return steering
        return steering.saes.get(self.part) if steering.saes else None

    def _conditions_of(self, conditions: CompiledConditions | None) -> CompiledConditions | None:
        return conditions.part(self.part) if conditions is not None else None

    def set_default_steering(self, steering: CompiledSteering | None) -> None:
        """Steering for forward passes without a context (a plain `model(...)` or `generate()` call).

        Such passes have no generated mask, so a "generated_only" default steers nothing there.
        Rows of a scheduled batch use only their own RowInfo.steering (None: unsteered).
        """
        self._default_steering = steering
        self._default_batch = None

    def set_monitored_features(self, indices: Sequence[int]) -> None:
        sae = self._require_sae()
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < sae.d_sae]
        if bad:
            raise InvalidFeatureIndexError(f"monitored feature indices outside [0, {sae.d_sae}): {bad}")
        self.monitored_features = tuple(indices)
        self._monitored_index = (
            torch.tensor(self.monitored_features, dtype=torch.long, device=sae.device) if indices else None
        )
        self._plan = None  # the capture groups carry the monitored features

    # ForwardInterceptor -------------------------------------------------------------------------

    def set_context(self, context: ForwardContext | None) -> None:
        self._pending = []
        self._pending_aborts = None
        if context is not None and self.sae is not None:
            rows = len(context.rows)
            if (
                context.valid_mask.shape[0] != rows
                or context.generated_mask.shape != context.valid_mask.shape
            ):
                raise ValueError(
                    f"context masks {tuple(context.valid_mask.shape)}/{tuple(context.generated_mask.shape)} "
                    f"do not match its {rows} rows"
                )
            device = self.sae.device
            if context.valid_mask.device != device or context.generated_mask.device != device:
                context = ForwardContext(
                    rows=context.rows,
                    generated_mask=context.generated_mask.to(device, non_blocking=True),
                    valid_mask=context.valid_mask.to(device, non_blocking=True),
                )
        self._context = context

    def collect(self) -> dict[str, FeatureCapture | SteeringAbort | tuple]:
        """The captures of the last forward pass, as Python lists (one host transfer per tensor).

        A row with more than one entry (read before and after steering, an abort) gets a tuple of them."""
        pendings, self._pending = self._pending, []
        captures: dict[str, FeatureCapture | SteeringAbort | tuple] = {}

        def add(request_id: str, entry: FeatureCapture | SteeringAbort) -> None:
            earlier = captures.get(request_id)
            captures[request_id] = entry if earlier is None else (*(earlier if isinstance(earlier, tuple)
                                                                    else (earlier,)), entry)

        for pending in pendings:
            for request_id, capture in self._collect_one(pending).items():
                add(request_id, capture)
        aborts, self._pending_aborts = self._pending_aborts, None
        if aborts is not None:
            pending, plan = aborts
            for request_id, abort in collect_aborts(pending, [r.request_id for r in plan.rows],
                                                    plan.conditions.conditions).items():
                add(request_id, abort)
        return captures

    @staticmethod
    def _collect_one(pending: _PendingCapture) -> dict[str, FeatureCapture]:
        valid = pending.valid.cpu().tolist()
        generated = pending.generated.cpu().tolist()
        indices = pending.topk_indices.cpu().tolist()
        values = pending.topk_values.float().cpu().tolist()
        monitored = (
            pending.monitored_values.float().cpu().tolist() if pending.monitored_values is not None else None
        )
        captures: dict[str, FeatureCapture] = {}
        for row, request_id in enumerate(pending.request_ids):
            positions = [t for t, is_valid in enumerate(valid[row]) if is_valid]
            monitored_by_feature = {
                feature: [monitored[row][t][m] for t in positions] if monitored is not None else []
                for m, feature in enumerate(pending.group.features)
            }
            captures[request_id] = FeatureCapture(
                input_positions=positions,
                generated=[generated[row][t] for t in positions],
                topk_indices=[indices[row][t] for t in positions],
                topk_values=[values[row][t] for t in positions],
                monitored=monitored_by_feature,
                steered=pending.group.steered,
                sae=pending.group.sae,
            )
        return captures

    # The hot path ---------------------------------------------------------------------------------

    def _on_layer_output(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        # transformers 5.x decoder layers return the hidden states; older layouts return a tuple.
        hidden = output[0] if isinstance(output, tuple) else output
        context = self._context
        if context is None:
            steered = self._steer_without_context(hidden)
        else:
            steered = self._steer_and_capture(hidden, context)
        if steered is hidden:
            return None  # the hook's "leave the output alone"
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    def _steer_without_context(self, hidden: torch.Tensor) -> torch.Tensor:
        default = self._steering_of(self._default_steering)
        if default is None:
            return hidden
        batch = self._default_batch
        steerings = (default,) * hidden.shape[0]
        if batch is None or not batch.matches(steerings, hidden.device, hidden.dtype):
            batch = self._default_batch = batch_steering(steerings, device=hidden.device, dtype=hidden.dtype)
        start = time.perf_counter_ns()
        steered = apply_steering(hidden, batch)
        if self._timer is not None:
            self._timer.steering(time.perf_counter_ns() - start)
        return steered

    def _steer_and_capture(self, hidden: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        if hidden.shape[:2] != context.valid_mask.shape:
            raise RuntimeError(
                f"forward context is for a {tuple(context.valid_mask.shape)} batch but layer "
                f"{self.sae.hook_layer if self.sae else '?'} saw {tuple(hidden.shape[:2])}: "
                "set_context must be called before every forward pass (None for a plain call)"
            )
        plan = self._plan_for(context, hidden)
        board = self.board
        if board is not None:
            board.stash(self.sae.hook_layer, hidden)
        if plan.capture_before is not None:
            self._capture(hidden, context, plan.capture_before)
        start = time.perf_counter_ns()
        steered = apply_steering(hidden, plan.steering, context.generated_mask, context.valid_mask)
        if plan.conditions is not None:
            residual_of = (lambda source: board.residual(source, hidden)) if board is not None else None
            steered, aborts = apply_conditions(hidden, steered, plan.conditions, context.generated_mask,
                                               context.valid_mask, residual_of)
            self._pending_aborts = (aborts, plan) if aborts is not None else None
        if self._timer is not None and steered is not hidden:  # unsteered batches: nothing ran, nothing to time
            self._timer.steering(time.perf_counter_ns() - start)
        if plan.capture_after is not None:
            self._capture(steered, context, plan.capture_after)
        return steered

    def _plan_for(self, context: ForwardContext, hidden: torch.Tensor) -> _BatchPlan:
        plan = self._plan
        # RowInfo equality compares CompiledSteering by identity (eq=False), so this is cheap.
        if (
            plan is not None
            and plan.rows == context.rows
            and plan.steering.device == hidden.device
            and plan.steering.dtype == hidden.dtype
            and plan.monitoring == (self.top_k, self.capture_after_steering, self.monitored_features)
        ):
            return plan
        conditions = batch_conditions([self._conditions_of(getattr(row, "conditions", None)) for row in context.rows],
                                      device=hidden.device, dtype=hidden.dtype)
        if conditions is not None and self.board is not None:
            self.board.lag_layers.update(layer for kind, *rest in conditions.sources if kind == LAG
                                         for layer in rest)
        plan = self._plan = _BatchPlan(
            rows=context.rows,
            steering=batch_steering(
                [self._steering_of(row.steering) for row in context.rows], device=hidden.device, dtype=hidden.dtype
            ),
            capture_before=self._capture_group(context.rows, hidden.device, steered=False),
            capture_after=self._capture_group(context.rows, hidden.device, steered=True),
            monitoring=(self.top_k, self.capture_after_steering, self.monitored_features),
            conditions=conditions,
        )
        return plan

    def _capture_group(self, rows: tuple[RowInfo, ...], device: torch.device, *, steered: bool) -> _CaptureGroup | None:
        """The rows that read the residual before (or after) steering, and the k and features they need."""
        monitors = self.capture_after_steering == steered
        chosen, monitored_rows, top_k, features = [], [], 0, list(self.monitored_features) if monitors else []
        for i, row in enumerate(rows):
            asks = getattr(row, "features", None)
            # The default hook captures requests for the default SAE; another SAE's hook those naming it.
            wants = asks is not None and asks.after_steering == steered and getattr(asks, "sae", None) == self.part
            if not (wants or (row.monitor and monitors)):
                continue
            chosen.append(i)
            monitored_rows.append(row.monitor and monitors)
            if row.monitor and monitors:  # every attached SAE's hook gives monitored rows its top-k frames
                top_k = max(top_k, self.top_k)
            if wants:
                top_k = max(top_k, asks.top_k)
                features.extend(f for f in asks.features if f not in features)
        if not chosen:
            return None
        d_sae = self.sae.d_sae if self.sae is not None else top_k
        return _CaptureGroup(
            rows=torch.tensor(chosen, dtype=torch.long, device=device),
            covers_all_rows=len(chosen) == len(rows),
            request_ids=tuple(rows[i].request_id for i in chosen),
            top_k=max(1, min(top_k, d_sae)),
            features=tuple(features),
            feature_index=torch.tensor(features, dtype=torch.long, device=device) if features else None,
            statistics_rows=torch.tensor(monitored_rows, dtype=torch.bool, device=device).unsqueeze(1)
            if any(monitored_rows) else None,
            steered=steered,
            sae=self.part,
        )

    def _capture(self, hidden: torch.Tensor, context: ForwardContext, group: _CaptureGroup) -> None:
        sae = self._require_sae()
        rows = group.rows

        def monitored_rows(tensor: torch.Tensor) -> torch.Tensor:
            return tensor if group.covers_all_rows else tensor.index_select(0, rows)

        start = time.perf_counter_ns()
        features = sae.encode(monitored_rows(hidden))  # (Bm, T, d_sae)
        encoded = time.perf_counter_ns()
        valid = monitored_rows(context.valid_mask)
        top_values, top_indices = torch.topk(features, k=group.top_k, dim=-1)
        self._pending.append(_PendingCapture(
            group=group,
            request_ids=group.request_ids,
            topk_indices=top_indices,
            topk_values=top_values,
            monitored_values=(
                features.index_select(-1, group.feature_index) if group.feature_index is not None else None
            ),
            valid=valid,
            generated=monitored_rows(context.generated_mask),
        ))
        if self.collect_statistics and self.statistics is not None and group.statistics_rows is not None:
            # Only monitored rows feed the statistics: a request asking for its own features does not.
            self.statistics.update(features, include=valid & group.statistics_rows)
        if self._timer is not None:
            self._timer.encode(encoded - start)
            self._timer.capture(time.perf_counter_ns() - encoded)

    def _require_sae(self) -> SaeWeights:
        if self.sae is None:
            raise SaeNotAttachedError("no SAE is attached")
        return self.sae


class SaeHooks:
    """Every attached SAE's hook as one ForwardInterceptor, in attach order (the first is the default
    SAE's), with the ResidualBoard they share. The runtime swaps `hooks` on the loop thread."""

    def __init__(self) -> None:
        self.board = ResidualBoard()
        self.hooks: tuple[SaeHook, ...] = ()

    def set_context(self, context: ForwardContext | None) -> None:
        self.board.begin(context)
        for hook in self.hooks:
            hook.set_context(context)

    def collect(self) -> dict[str, Any]:
        hooks = self.hooks
        if len(hooks) == 1:
            return hooks[0].collect()
        captures: dict[str, Any] = {}
        for hook in hooks:
            for request_id, entry in hook.collect().items():
                earlier = captures.get(request_id)
                entries = entry if isinstance(entry, tuple) else (entry,)
                captures[request_id] = entry if earlier is None else (
                    *(earlier if isinstance(earlier, tuple) else (earlier,)), *entries)
        return captures
