"""The calls the inference process answers (`call_<type>`), each a thin adapter from a typed call
(inference/messages.py) to the engine runtime and back to a typed reply, with catalog bookkeeping
on the Django side. Engine errors carry their code, status and param; `error_reply` forwards them."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from typing import Any, Protocol

import structlog
import torch
from asgiref.sync import sync_to_async
from django.conf import settings

from catalog.models import LanguageModel, ModelStatus
from catalog.services import model_set_status
from engine.control_vectors import LayerVector, VectorSteeringSpec, steering_control_vector
from engine.errors import (
    EngineError,
    GenerationFailedError,
    InvalidFeatureIndexError,
    InvalidSteeringError,
    SaeNotAttachedError,
)
from engine.feature_lens import feature_logits, unembedding_with_gain
from engine.generation import FinishEvent, TokenEvent
from engine.request_features import FeatureRequest
from engine.runtime import EngineRuntime
from engine.sampling import InvalidRequestError
from engine.steering import SteeringFeature, SteeringSpec
from engine.steering_conditions import ConditionalFeature, FeatureCondition, SteeringConditions
from engine.token_diff import ScoringRow, prompt_token_ids, score_rows, token_diff
from inference import messages as m
from inference.client import EMBED_TIMEOUT_S
from monitoring.models import CaptureSettings
from steering.models import SaeStatus, SparseAutoencoder, SteeringState
from steering.sae_addressing import ATTACH_ORDER
from steering.sae_services import sae_detach_all_marks, sae_set_status
from steering.steering_services import steering_state_message

log = structlog.get_logger("millm.inference")
# Streamed tokens are coalesced into chunk messages. The relay (pydantic, msgpack, a Redis round trip)
# runs on this process's event loop, which shares the GIL with the decode loop, so the process as a whole
# keeps to ~RELAY_MESSAGES_PER_S: one request streams a message per 20 ms at most, 8 at once one each per
# 160 ms (~4 tokens at CPU decode speed), never slower than one per 250 ms.
CHUNK_INTERVAL_S = 0.02
RELAY_MESSAGES_PER_S = 50
CHUNK_INTERVAL_MAX_S = 0.25
LEASE_CHECK_S = 0.5


def chunk_interval(generating: int) -> float:
    """The least time between two chunk messages of one request, while `generating` requests run here."""
    return min(CHUNK_INTERVAL_MAX_S, max(CHUNK_INTERVAL_S, generating / RELAY_MESSAGES_PER_S))


def in_thread(fn, *args, **kwargs):
    return asyncio.to_thread(fn, *args, **kwargs)


db = sync_to_async  # catalog reads/writes from the event loop


class Transport(Protocol):
    """What the calls need of the process that runs them (inference.process.InferenceWorker)."""

    own_channel: str
    started_at: float
    process_id: str
    pinned_model: str | None  # serves this model only, whatever the catalog's desired model is

    async def send(self, channel: str, message: dict) -> None: ...


def error_reply(exc: BaseException) -> m.Error:
    """The one place an exception becomes an `error` reply: engine errors carry their code, status, param."""
    if isinstance(exc, EngineError):
        return m.Error(code=exc.code, status=exc.status, message=exc.message, param=exc.param)
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return m.Error(code="INSUFFICIENT_MEMORY", status=507, message=str(exc) or "not enough memory")
    return m.Error(code="INTERNAL_ERROR", status=500,
                   message=f"inference error ({exc.__class__.__name__}); see the inference log")


def feature_request(features: m.ReturnFeatures | None, attached: str | None,
                    others: tuple[str, ...] = ()) -> FeatureRequest | None:
    """`attached`: the default SAE; `others`: the other attached SAEs, whose features a request may ask for."""
    if features is None:
        return None
    if features.sae is not None and features.sae != attached and features.sae not in others:
        raise SaeNotAttachedError(f"return_features.sae: SAE {features.sae} is not attached "
                                  f"(attached: {', '.join((attached, *others)) if attached else 'none'})",
                                  param="return_features.sae")
    return FeatureRequest(top_k=features.top_k, positions=features.positions, features=tuple(features.features),
                          after_steering=features.after_steering,
                          sae=features.sae if features.sae != attached else None)


def engine_conditions(steering: m.Steering | None) -> SteeringConditions | None:
    """The conditional features and abort conditions of a steering (None when it has none)."""
    if steering is None:
        return None

    def condition(c: m.Condition) -> FeatureCondition:
        return FeatureCondition(c.index, c.above, c.below, sae=c.sae)

    conditions = SteeringConditions(
        features=tuple(ConditionalFeature(f.index, f.strength, condition(f.when), sae=f.sae)
                       for f in steering.features if f.when is not None),
        abort_when=tuple(condition(c) for c in steering.abort_when), positions=steering.positions)
    return conditions or None


def engine_spec(steering: m.Steering) -> SteeringSpec:
    return with_vectors(steering, SteeringSpec(features=tuple(SteeringFeature(f.index, f.strength, sae=f.sae) for f in steering.features
                                       if f.when is None),
                        mode=steering.mode, positions=steering.positions, layers=tuple(steering.layers),
                        direction=steering.direction, max_steered_tokens=steering.max_steered_tokens,
                        until_concept=steering.until_concept))


def with_vectors(steering: m.Steering, spec: SteeringSpec) -> SteeringSpec:
    """The spec plus the steering's raw vectors (engine/control_vectors.py), each part at its layer."""
    if not steering.vectors:
        return spec
    vectors = tuple(LayerVector({p.layer: torch.tensor(p.values, dtype=torch.float32)}, strength=p.strength,
                                name=p.name) for p in steering.vectors)
    return VectorSteeringSpec(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}, vectors=vectors)


class WorkerCalls:
    def __init__(self, worker: Transport, runtime: EngineRuntime | None) -> None:
        self.worker = worker
        self.runtime = runtime or EngineRuntime(memory_limit_bytes=settings.MEMORY_LIMIT_BYTES,
                                                torch_threads=settings.TORCH_THREADS,
                                                max_tokens_default=settings.MAX_TOKENS_DEFAULT,
                                                max_prompt_bytes=settings.MAX_PROMPT_BYTES,
                                                max_embed_tokens=settings.EMBED_MAX_TOKENS)
        self.handles: dict[str, Any] = {}
        self.leases: dict[str, float] = {}  # request id -> when its requester last said it listens
        self._unembedding: tuple[Any, torch.Tensor] | None = None  # (loaded model, W_U with gain): the logit lens

    # --- state ---------------------------------------------------------------------------------

    async def restore_desired_state(self) -> None:
        """After a (re)start: load what should be loaded, attach, steer — so a crash loses nothing.

        A pinned process loads its own model; the others the catalog's desired one."""
        capture = await db(CaptureSettings.current)()
        await in_thread(self.runtime.configure_monitoring, enabled=capture.enabled, top_k=capture.top_k,
                        features=list(capture.features))
        pinned = self.worker.pinned_model
        model = await db(lambda: LanguageModel.objects.filter(**({"name": pinned} if pinned else {"desired_loaded": True}))
                         .first())()
        if model is None:
            if pinned:
                log.warning("pinned_model_unknown", model=pinned)
            return
        reply = await self.call_load_model(m.LoadModel(model=model.name))
        if isinstance(reply, m.Error):
            log.warning("restore_load_failed", model=model.name, reason=reply.message)
            return
        # Every SAE that was attached, in the order it was attached: the first is the default again.
        desired = await db(lambda: list(SparseAutoencoder.objects.filter(desired_attached=True, model=model)
                                        .order_by(*ATTACH_ORDER)))()
        attached = []
        for sae in desired:
            reply = await self.call_attach_sae(m.AttachSae(sae=sae.name))
            if isinstance(reply, m.Error):
                log.warning("restore_attach_failed", sae=sae.name, reason=reply.message)
                continue
            attached.append(sae)
        sae = attached[0] if attached else None
        state = await db(lambda: SteeringState.objects.select_related("sae").get_or_create(pk=1)[0])()
        # With an SAE: the active steering of its features (of every attached SAE); with none: stored vectors only.
        if state.sae_id == (sae.pk if sae is not None else None):
            try:
                steering = await db(steering_state_message)(state)
                if steering is not None:
                    reply = await self.call_set_steering(m.SetSteering(steering=steering,
                                                                       sae=sae.name if sae is not None else None))
                    if isinstance(reply, m.Error):
                        log.warning("restore_steering_failed", reason=reply.message)
            except Exception as exc:  # a feature of an SAE that failed to attach: serve unsteered, say why
                log.warning("restore_steering_failed", reason=str(exc))
        log.info("desired_state_restored", model=model.name, saes=[s.name for s in attached])

    async def shutdown(self) -> None:
        for handle in list(self.handles.values()):
            handle.cancel()
        await in_thread(self.runtime.unload)

    # --- management calls ----------------------------------------------------------------------

    async def call_ping(self, call: m.Ping) -> m.Pong:
        return m.Pong(pid=os.getpid(), uptime_s=round(time.time() - self.worker.started_at, 3),
                      process_id=self.worker.process_id, pinned_model=self.worker.pinned_model, **self.runtime.status())

    def _pinned_elsewhere(self, model: str | None) -> m.Skipped | None:
        """A pinned process ignores management calls about another model (and never unloads its own)."""
        pinned = self.worker.pinned_model
        if pinned and model != pinned:
            return m.Skipped(reason=f"this process is pinned to model {pinned}")
        return None

    async def call_load_model(self, call: m.LoadModel) -> m.Loaded | m.Error | m.Skipped:
        if (skipped := self._pinned_elsewhere(call.model)) is not None:
            return skipped
        model = await db(lambda: LanguageModel.objects.filter(name=call.model).first())()
        if model is None:
            return m.Error(code="MODEL_NOT_FOUND", status=404, message=f"No model named {call.model!r}")
        if model.status == ModelStatus.DOWNLOADING:
            return m.Error(code="CONFLICT", status=409, message=f"Model {model.name} is still downloading")
        dtype = call.dtype or model.dtype
        quantization = call.quantization or model.quantization
        pinned = self.worker.pinned_model is not None
        await db(model_set_status)(name=model.name, status=ModelStatus.LOADING, message=f"loading ({dtype})")
        if not pinned:  # a pinned process never changes model, so it never detaches another one's SAEs
            await db(sae_detach_all_marks)()
        try:
            loaded = await in_thread(self.runtime.load, name=model.name, path=model.local_path, dtype=dtype,
                                     quantization=None if quantization == "none" else quantization,
                                     gguf_file=model.gguf_file)
        except Exception as exc:
            reply = error_reply(exc)
            await db(model_set_status)(name=model.name, status=ModelStatus.ERROR, message=reply.message)
            return reply
        # The variant says what is served (dtype, quantization and its kernel, device): the Models page shows it.
        message_text = f"{loaded.variant}; {loaded.memory_bytes / 2**20:.0f} MiB, loaded in {loaded.load_seconds:.1f}s"
        # Only an unpinned load changes the catalog's desired model; a pinned one serves beside it.
        await db(model_set_status)(name=model.name, status=ModelStatus.LOADED, message=message_text,
                                   loaded=None if pinned else True)
        return m.Loaded(model=model.name, memory_bytes=loaded.memory_bytes)

    async def call_unload_model(self, call: m.UnloadModel) -> m.Unloaded | m.Skipped:
        if self.worker.pinned_model:
            return m.Skipped(reason=f"this process is pinned to model {self.worker.pinned_model}")
        name = self.runtime.model_name
        await in_thread(self.runtime.unload)
        await db(sae_detach_all_marks)()
        if name is not None:
            await db(model_set_status)(name=name, status=ModelStatus.READY, loaded=False)
        if call.model and call.model != name:
            await db(lambda: LanguageModel.objects.filter(name=call.model).update(desired_loaded=False))()
        return m.Unloaded(model=name)

    async def call_attach_sae(self, call: m.AttachSae) -> m.Attached | m.Error | m.Skipped:
        sae = await db(lambda: SparseAutoencoder.objects.select_related("model").filter(name=call.sae).first())()
        if sae is None:
            return m.Error(code="SAE_NOT_FOUND", status=404, message=f"No SAE named {call.sae!r}")
        if (skipped := self._pinned_elsewhere(sae.model.name)) is not None:
            return skipped
        if self.runtime.model_name != sae.model.name:
            return m.Error(code="MODEL_NOT_LOADED", status=400,
                           message=f"SAE {sae.name} reads model {sae.model.name}, which is not loaded "
                           f"(loaded: {self.runtime.model_name or 'none'})")
        try:
            # Beside the SAEs already attached; a refusal leaves them (and the model) as they were.
            await in_thread(self.runtime.attach_sae, name=sae.name, path=sae.local_path)
        except Exception as exc:
            reply = error_reply(exc)
            await db(sae_set_status)(name=sae.name, status=SaeStatus.ERROR, message=reply.message, attached=False)
            return reply
        await db(sae_set_status)(name=sae.name, status=SaeStatus.ATTACHED, attached=True)
        return m.Attached(sae=sae.name)

    async def call_detach_sae(self, call: m.DetachSae) -> m.Detached | m.Skipped:
        """Detach the named SAE (the others stay attached), or every SAE when the call names none."""
        if self.worker.pinned_model and call.sae and call.sae not in self.runtime.attached:
            return m.Skipped(reason=f"SAE {call.sae} is not attached in this process")
        names = [call.sae] if call.sae else list(self.runtime.attached)
        await in_thread(self.runtime.detach_sae, call.sae)
        for name in names:
            await db(sae_set_status)(name=name, status=SaeStatus.READY, attached=False)
        if call.sae and self.runtime.sae_name is not None:  # the next one is the default now: restored after a restart
            await db(sae_set_status)(name=self.runtime.sae_name, status=SaeStatus.ATTACHED, attached=True)
        return m.Detached(sae=call.sae or (names[0] if names else None))

    async def call_set_steering(self, call: m.SetSteering) -> m.SteeringSet | m.Error | m.Skipped:
        if self.worker.pinned_model and call.sae and call.sae not in self.runtime.attached:
            return m.Skipped(reason=f"SAE {call.sae} is not attached in this process")
        try:
            self.runtime.set_active_steering(engine_spec(call.steering), label=call.steering.label,
                                             conditions=engine_conditions(call.steering))
        except MemoryError as exc:
            await in_thread(self.runtime.detach_sae)
            return error_reply(exc)
        return m.SteeringSet(label=self.runtime.active_label)

    async def call_embed(self, call: m.Embed) -> m.Embeddings:
        # Within the web side's wait: work nobody waits for any more is dropped.
        result = await in_thread(self.runtime.embed, model=call.model, texts=call.texts, timeout_s=EMBED_TIMEOUT_S)
        return m.Embeddings(vectors=result.embeddings, prompt_tokens=result.total_tokens)

    async def call_configure_monitoring(self, call: m.ConfigureMonitoring) -> m.MonitoringSettings:
        settings = await in_thread(self.runtime.configure_monitoring, enabled=call.enabled, top_k=call.top_k,
                                   features=call.features)
        return m.MonitoringSettings(enabled=settings.enabled, top_k=settings.top_k, features=list(settings.features),
                                    active=self.runtime.hook.attached)

    async def call_statistics(self, call: m.GetStatistics) -> m.Statistics:
        return m.Statistics(**self.runtime.statistics(top=call.top, by=call.by, sae=call.sae))

    async def call_reset_statistics(self, call: m.ResetStatistics) -> m.StatisticsReset:
        self.runtime.reset_statistics()
        return m.StatisticsReset()

    async def call_feature_logit_lens(self, call: m.FeatureLogitLens) -> m.FeatureLogits:
        sae = self.runtime.attached_hook(call.sae).sae  # any attached SAE, by name
        if not call.index < sae.d_sae:
            raise InvalidFeatureIndexError(f"index: {call.index} is outside 0..{sae.d_sae - 1} for SAE {call.sae}")
        loaded = self.runtime.loaded
        if self._unembedding is None or self._unembedding[0] is not loaded:  # once per load, not per page view
            self._unembedding = (loaded, await in_thread(unembedding_with_gain, loaded.model))
        promoted, suppressed = await in_thread(feature_logits, sae.W_dec[call.index], self._unembedding[1],
                                               loaded.tokenizer, count=call.count)
        return m.FeatureLogits(sae=call.sae, index=call.index,
                               promoted=[m.TokenLogit(**vars(t)) for t in promoted],
                               suppressed=[m.TokenLogit(**vars(t)) for t in suppressed])

    def _scoring_parts(self, sae_name: str) -> tuple[Any, Any, Any]:
        """The scheduler, loaded model and SAE a scoring call runs on (the named SAE, any attached one, reads
        the features; SAE_NOT_ATTACHED otherwise)."""
        scheduler = self.runtime.require_model()
        if sae_name not in self.runtime.attached:
            raise SaeNotAttachedError(f"SAE {sae_name} is not attached "
                                      f"(attached: {', '.join(self.runtime.attached) or 'none'})")
        return scheduler, self.runtime.loaded, self.runtime.attached_hook(sae_name).sae

    def _check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.runtime.loaded.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(param=param, message=f"{param}: token ids must be within 0..{vocab - 1}")

    async def call_token_diff(self, call: m.TokenDiff) -> m.TokenDiffResult:
        runtime = self.runtime
        scheduler, loaded, _ = self._scoring_parts(call.sae)  # the default SAE, still attached
        self._check_ids(call.steered_ids, "steered_ids")
        self._check_ids(call.unsteered_ids, "unsteered_ids")
        # The same compile the steered generation ran, conditional features included.
        compiled = runtime.compile(engine_spec(call.steering))
        conditions = runtime.compile_conditions(engine_conditions(call.steering), call.steering.mode,
                                                layers=call.steering.layers, direction=call.steering.direction)
        tokenizer = loaded.tokenizer
        prompt_ids = await in_thread(prompt_token_ids, tokenizer, call.prompt, call.messages)
        hooks = scheduler.interceptors  # every SAE hook and the layer hook, as generation runs them
        readers = {name: attached.sae for name, attached in runtime.attached.items()}  # every attached SAE reads
        diff = await asyncio.wrap_future(scheduler.call(lambda: token_diff(
            loaded.model, hooks, prompt_ids=prompt_ids, steered_ids=call.steered_ids,
            unsteered_ids=call.unsteered_ids, steering=compiled, pad_id=tokenizer.pad_token_id or 0, saes=readers,
            top_features=call.top_features, conditions=conditions)))
        return m.TokenDiffResult(
            tokens=[m.TokenDiffToken(token=tokenizer.decode([t.token_id]), **vars(t)) for t in diff.tokens],
            first_divergence=diff.first_divergence,
            top_changed_features=[m.FeatureChange(**vars(f)) for f in diff.top_changed_features], saes=list(readers))

    async def call_score_texts(self, call: m.ScoreTexts) -> m.TextScores:
        scheduler, loaded, sae = self._scoring_parts(call.sae)
        for position, index in enumerate(call.features):
            if not 0 <= index < sae.d_sae:
                raise InvalidFeatureIndexError(f"features[{position}]: {index} is outside 0..{sae.d_sae - 1}")
        for position, text in enumerate(call.texts):
            self._check_ids(text.generated_ids, f"texts[{position}].generated_ids")
        tokenizer = loaded.tokenizer
        rows = [ScoringRow(await in_thread(prompt_token_ids, tokenizer, t.prompt, t.messages), t.generated_ids)
                for t in call.texts]
        hooks, columns = scheduler.interceptors, list(call.features)
        scored = await asyncio.wrap_future(scheduler.call(lambda: score_rows(
            loaded.model, hooks, rows, pad_id=tokenizer.pad_token_id or 0, sae=sae)))
        return m.TextScores(scores=[m.TextScore(
            tokens=len(row.generated_ids), mean_logprob=s.mean_logprob,
            feature_means=(s.features[:, columns].mean(dim=0).tolist() if len(row.generated_ids)
                           else [0.0] * len(columns)))
            for row, s in zip(rows, scored, strict=True)])

    async def call_export_steering(self, call: m.ExportSteering) -> m.SteeringExported:
        runtime = self.runtime
        runtime.require_model()
        compiled = runtime.compile(engine_spec(call.steering))
        if compiled is None:
            raise InvalidSteeringError("the steering adds nothing: there is no control vector to export")
        sae_layer = runtime.hook.sae.hook_layer if runtime.hook.attached else 0
        model_hint = str(getattr(runtime.loaded.model.config, "model_type", "") or "")
        vector = steering_control_vector(compiled, sae_layer=sae_layer, model_hint=model_hint,
                                         part_layers={n: a.sae.hook_layer for n, a in runtime.attached.items()})
        return m.SteeringExported(model_hint=model_hint, parts=[
            m.VectorPart(layer=layer, values=vector.directions[layer].tolist()) for layer in vector.layers])

    async def call_lease(self, call: m.Lease) -> None:
        now = time.monotonic()
        for request_id in call.request_ids:
            if request_id in self.leases:
                self.leases[request_id] = now

    async def _watch_lease(self, handle: Any, lease_s: float) -> None:
        """Cancel a generation whose requester stopped renewing its lease: nobody reads it any more."""
        while True:
            await asyncio.sleep(min(LEASE_CHECK_S, lease_s))
            renewed = self.leases.get(handle.request_id)
            if renewed is None:
                return
            if time.monotonic() - renewed > lease_s:
                log.info("generation_orphaned", request_id=handle.request_id, lease_s=lease_s)
                handle.cancel()
                return

    async def call_cancel(self, call: m.Cancel) -> None:
        handle = self.handles.get(call.request_id)
        if handle is not None:
            handle.cancel()

    # --- generation ----------------------------------------------------------------------------

    async def call_generate(self, call: m.Generate) -> m.Done | m.Error | None:
        reply_channel = call.reply_channel
        steering = call.steering
        # In a thread: tokenizing a long prompt must not stall pings and other requests on this loop.
        submitted = await in_thread(
            self.runtime.submit,
            request_id=call.request_id, model=call.model, prompt=call.prompt, messages=call.messages,
            params=call.params, steering=engine_spec(steering) if steering is not None else None,
            steering_label=steering.label if steering is not None else "inline", monitor=call.monitor,
            features=feature_request(call.features, self.runtime.sae_name, tuple(self.runtime.attached)[1:]),
            conditions=engine_conditions(steering))
        sae_name = (call.features.sae if call.features is not None and call.features.sae else None) or self.runtime.sae_name
        handle = submitted.handle
        self.handles[handle.request_id] = handle
        finished = False
        watchdog = None
        if call.lease_s:
            self.leases[handle.request_id] = time.monotonic()
            watchdog = asyncio.ensure_future(self._watch_lease(handle, call.lease_s))
        try:
            await self.worker.send(reply_channel, m.Started(
                worker_channel=self.worker.own_channel, request_id=handle.request_id,
                prompt_tokens=handle.prompt_tokens, steering=submitted.steering_label,
                prompt_text=submitted.prompt_text).model_dump())
            wants_logprobs = bool(call.params.get("logprobs"))
            # Between two chunks the tokens wait (coalescing); a finish ends the wait at once.
            async for events in handle.batches(pause=lambda: chunk_interval(len(self.handles))):
                tokens = [e for e in events if isinstance(e, TokenEvent)]
                if tokens:
                    # Built once per chunk, not per token: the per-token path stays in the engine.
                    frames = ([f for t in tokens for f in submitted.frames.frames(t.token_id, t.captures)]
                              if submitted.frames is not None else None)
                    returned = ({"sae": sae_name, "tokens": [f for t in tokens
                                                             for f in submitted.features.frames(t.token_id, t.captures)]}
                                if submitted.features is not None else None)
                    chunk = m.Chunk(text="".join(t.text_delta for t in tokens),
                                    tokens=[self._token(t, wants_logprobs) for t in tokens], frames=frames,
                                    features=returned)
                    # No "frames" key at all when unmonitored: readers treat the key as "frames follow".
                    unset = {k for k, v in (("frames", frames), ("features", returned)) if v is None}
                    await self.worker.send(reply_channel, chunk.model_dump(exclude=unset or None))
                finish = events[-1] if isinstance(events[-1], FinishEvent) else None
                if finish is not None:
                    finished = True
                    return self._done(finish, submitted.steering_label)
        finally:
            self.handles.pop(handle.request_id, None)
            self.leases.pop(handle.request_id, None)
            if watchdog is not None:
                watchdog.cancel()
            if not finished:  # the reply channel broke or the process is stopping: free the batch row
                handle.cancel()
        return None

    def _token(self, token: TokenEvent, with_logprobs: bool) -> m.Token:
        if not with_logprobs:
            return m.Token(id=token.token_id, text=token.text_delta)
        decode = self.runtime.loaded.tokenizer.decode
        return m.Token(id=token.token_id, text=decode([token.token_id]), logprob=token.logprob,
                       top_logprobs=[m.TopLogprob(text=decode([i]), logprob=lp) for i, lp in token.top_logprobs or ()])

    def _done(self, finish: FinishEvent, steering_label: str) -> m.Done | m.Error:
        if finish.finish_reason == "error":
            return error_reply(GenerationFailedError(finish.error or "generation failed"))
        abort = None
        if finish.abort is not None:  # the token where the abort held, as text too
            abort = {**finish.abort, "token": self.runtime.loaded.tokenizer.decode([finish.abort["token_id"]])
                     if finish.abort.get("token_id") is not None else None}
        return m.Done(finish_reason=finish.finish_reason, steering=steering_label, abort=abort,
                      usage=m.Usage(prompt_tokens=finish.usage.prompt_tokens,
                                    completion_tokens=finish.usage.completion_tokens),
                      timings=m.Timings(queued_s=finish.timings.queued_s, first_token_s=finish.timings.first_token_s,
                                        total_s=finish.timings.total_s))
