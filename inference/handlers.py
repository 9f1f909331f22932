"""The calls the inference process answers (`call_<type>`), each a thin adapter from a channel
message to the engine runtime and back, with catalog bookkeeping on the Django side."""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

import structlog
import torch
from asgiref.sync import sync_to_async
from django.conf import settings

from catalog.models import LanguageModel, ModelStatus
from catalog.services import model_set_status
from engine.generation import FinishEvent, TokenEvent
from engine.loading import InsufficientMemoryError, ModelLoadError, ModelNotFoundError
from engine.runtime import EngineRuntime, RuntimeRefusal
from engine.sae import SaeError
from engine.sampling import InvalidRequestError
from engine.scheduler import SchedulerUnavailableError
from engine.steering import InvalidFeatureIndexError, InvalidSteeringError
from steering.models import SaeStatus, SparseAutoencoder, SteeringState
from steering.sae_services import sae_detach_all_marks, sae_set_status
from steering.steering_services import steering_state_engine_spec

if TYPE_CHECKING:
    from inference.process import InferenceWorker

log = structlog.get_logger("millm.inference")
CHUNK_INTERVAL_S = 0.02  # coalesce tokens into at most one message per request per 20 ms


def in_thread(fn, *args, **kwargs):
    return asyncio.to_thread(fn, *args, **kwargs)


db = sync_to_async  # catalog reads/writes from the event loop


class WorkerCalls:
    def __init__(self, worker: InferenceWorker, runtime: EngineRuntime | None) -> None:
        self.worker = worker
        self.runtime = runtime or EngineRuntime(memory_limit_bytes=settings.MEMORY_LIMIT_BYTES,
                                                torch_threads=settings.TORCH_THREADS)
        self.handles: dict[str, Any] = {}

    # --- errors --------------------------------------------------------------------------------

    @staticmethod
    def error_reply(exc: Exception) -> dict[str, Any]:
        if isinstance(exc, RuntimeRefusal):
            return {"type": "error", "code": exc.code, "status": exc.status, "message": exc.message}
        if isinstance(exc, InvalidRequestError):
            return {"type": "error", "code": exc.code or "invalid_value", "status": 400, "message": exc.message,
                    "param": exc.param}
        if isinstance(exc, InvalidFeatureIndexError):
            return {"type": "error", "code": "INVALID_FEATURE_INDEX", "status": 400, "message": str(exc)}
        if isinstance(exc, InvalidSteeringError | SaeError):
            return {"type": "error", "code": "VALIDATION_ERROR", "status": 422, "message": str(exc)}
        if isinstance(exc, InsufficientMemoryError | MemoryError | torch.OutOfMemoryError):
            return {"type": "error", "code": "INSUFFICIENT_MEMORY", "status": 507,
                    "message": str(exc) or "not enough memory"}
        if isinstance(exc, ModelNotFoundError):
            return {"type": "error", "code": "MODEL_NOT_FOUND", "status": 404, "message": str(exc)}
        if isinstance(exc, ModelLoadError):
            return {"type": "error", "code": "VALIDATION_ERROR", "status": 422, "message": str(exc)}
        if isinstance(exc, SchedulerUnavailableError):
            return {"type": "error", "code": "INFERENCE_UNAVAILABLE", "status": 503, "message": str(exc),
                    "error_type": "server_error"}
        return {"type": "error", "code": "INTERNAL_ERROR", "status": 500, "error_type": "server_error",
                "message": f"inference error ({exc.__class__.__name__}); see the inference log"}

    # --- state ---------------------------------------------------------------------------------

    async def restore_desired_state(self) -> None:
        """After a (re)start: load what should be loaded, attach, steer — so a crash loses nothing."""
        model = await db(lambda: LanguageModel.objects.filter(desired_loaded=True).first())()
        if model is None:
            return
        reply = await self.call_load_model({"model": model.name})
        if reply.get("type") == "error":
            log.warning("restore_load_failed", model=model.name, reason=reply["message"])
            return
        sae = await db(lambda: SparseAutoencoder.objects.filter(desired_attached=True, model=model).first())()
        if sae is not None:
            reply = await self.call_attach_sae({"sae": sae.name})
            if reply.get("type") == "error":
                log.warning("restore_attach_failed", sae=sae.name, reason=reply["message"])
                return
            state = await db(lambda: SteeringState.objects.select_related("sae").get_or_create(pk=1)[0])()
            spec = await db(steering_state_engine_spec)(state) if state.sae_id == sae.pk else None
            if spec is not None:
                await self.call_set_steering({"steering": spec[0], "label": spec[1]})
        log.info("desired_state_restored", model=model.name, sae=sae.name if sae else None)

    async def shutdown(self) -> None:
        for handle in list(self.handles.values()):
            handle.cancel()
        await in_thread(self.runtime.unload)

    # --- management calls ----------------------------------------------------------------------

    async def call_ping(self, message: dict) -> dict[str, Any]:
        return {"type": "pong", "pid": os.getpid(), "uptime_s": round(time.time() - self.worker.started_at, 3),
                **self.runtime.status()}

    async def call_load_model(self, message: dict) -> dict[str, Any]:
        model = await db(lambda: LanguageModel.objects.filter(name=message["model"]).first())()
        if model is None:
            return {"type": "error", "code": "MODEL_NOT_FOUND", "status": 404,
                    "message": f"No model named {message['model']!r}"}
        if model.status == ModelStatus.DOWNLOADING:
            return {"type": "error", "code": "CONFLICT", "status": 409,
                    "message": f"Model {model.name} is still downloading"}
        dtype = message.get("dtype") or model.dtype
        quantization = message.get("quantization") or model.quantization
        await db(model_set_status)(name=model.name, status=ModelStatus.LOADING, message=f"loading ({dtype})")
        await db(sae_detach_all_marks)()
        try:
            loaded = await in_thread(self.runtime.load, name=model.name, path=model.local_path, dtype=dtype,
                                     quantization=None if quantization == "none" else quantization,
                                     gguf_file=model.gguf_file)
        except Exception as exc:
            reply = self.error_reply(exc)
            await db(model_set_status)(name=model.name, status=ModelStatus.ERROR, message=reply["message"])
            return reply
        message_text = f"{loaded.memory_bytes / 2**20:.0f} MiB, loaded in {loaded.load_seconds:.1f}s"
        await db(model_set_status)(name=model.name, status=ModelStatus.LOADED, message=message_text, loaded=True)
        return {"type": "loaded", "model": model.name, "memory_bytes": loaded.memory_bytes}

    async def call_unload_model(self, message: dict) -> dict[str, Any]:
        name = self.runtime.model_name
        await in_thread(self.runtime.unload)
        await db(sae_detach_all_marks)()
        if name is not None:
            await db(model_set_status)(name=name, status=ModelStatus.READY, loaded=False)
        if message.get("model") and message["model"] != name:
            await db(lambda: LanguageModel.objects.filter(name=message["model"]).update(desired_loaded=False))()
        return {"type": "unloaded", "model": name}

    async def call_attach_sae(self, message: dict) -> dict[str, Any]:
        sae = await db(lambda: SparseAutoencoder.objects.select_related("model").filter(name=message["sae"]).first())()
        if sae is None:
            return {"type": "error", "code": "SAE_NOT_FOUND", "status": 404, "message": f"No SAE named {message['sae']!r}"}
        if self.runtime.model_name != sae.model.name:
            return {"type": "error", "code": "MODEL_NOT_LOADED", "status": 400,
                    "message": f"SAE {sae.name} reads model {sae.model.name}, which is not loaded "
                    f"(loaded: {self.runtime.model_name or 'none'})"}
        try:
            await in_thread(self.runtime.attach_sae, name=sae.name, path=sae.local_path)
        except Exception as exc:
            reply = self.error_reply(exc)
            await in_thread(self.runtime.detach_sae)  # nothing half-attached; the base model keeps serving
            await db(sae_set_status)(name=sae.name, status=SaeStatus.ERROR, message=reply["message"], attached=False)
            return reply
        await db(sae_set_status)(name=sae.name, status=SaeStatus.ATTACHED, attached=True)
        return {"type": "attached", "sae": sae.name}

    async def call_detach_sae(self, message: dict) -> dict[str, Any]:
        name = self.runtime.sae_name
        await in_thread(self.runtime.detach_sae)
        if name is not None:
            await db(sae_set_status)(name=name, status=SaeStatus.READY, attached=False)
        return {"type": "detached", "sae": name}

    async def call_set_steering(self, message: dict) -> dict[str, Any]:
        try:
            self.runtime.set_active_steering(message["steering"], label=message.get("label", "active"))
        except MemoryError as exc:
            await in_thread(self.runtime.detach_sae)
            return self.error_reply(exc)
        return {"type": "steering_set", "label": self.runtime.active_label}

    async def call_embed(self, message: dict) -> dict[str, Any]:
        result = await in_thread(self.runtime.embed, model=message.get("model"), texts=message["texts"])
        return {"type": "embeddings", "vectors": result.embeddings, "prompt_tokens": result.total_tokens}

    async def call_configure_monitoring(self, message: dict) -> dict[str, Any]:
        settings = await in_thread(self.runtime.configure_monitoring, enabled=message.get("enabled"),
                                   top_k=message.get("top_k"), features=message.get("features"))
        return {"type": "monitoring", "enabled": settings.enabled, "top_k": settings.top_k,
                "features": list(settings.features), "active": self.runtime.hook.attached}

    async def call_statistics(self, message: dict) -> dict[str, Any]:
        return {"type": "statistics", **self.runtime.statistics(top=int(message.get("top", 20)),
                                                                by=message.get("by", "mean"))}

    async def call_reset_statistics(self, message: dict) -> dict[str, Any]:
        self.runtime.reset_statistics()
        return {"type": "statistics_reset"}

    async def call_cancel(self, message: dict) -> None:
        handle = self.handles.get(message["request_id"])
        if handle is not None:
            handle.cancel()

    # --- generation ----------------------------------------------------------------------------

    async def call_generate(self, message: dict) -> dict[str, Any] | None:
        reply_channel = message["reply_channel"]
        submitted = self.runtime.submit(
            request_id=message["request_id"], model=message.get("model"), prompt=message.get("prompt"),
            messages=message.get("messages"), params=message.get("params", {}), steering=message.get("steering"),
            monitor=message.get("monitor"))
        handle = submitted.handle
        self.handles[handle.request_id] = handle
        finished = False
        try:
            await self.worker.send(reply_channel, {
                "type": "started", "worker_channel": self.worker.own_channel, "request_id": handle.request_id,
                "prompt_tokens": handle.prompt_tokens, "steering": submitted.steering_label,
                "prompt_text": submitted.prompt_text})
            wants_logprobs = bool(message.get("params", {}).get("logprobs"))
            async for events in handle.batches():
                sent_at = time.monotonic()
                tokens = [e for e in events if isinstance(e, TokenEvent)]
                if tokens:
                    chunk = {"type": "chunk", "text": "".join(t.text_delta for t in tokens),
                             "tokens": [self._token_dict(t, wants_logprobs) for t in tokens]}
                    if submitted.frames is not None:
                        chunk["frames"] = [f for t in tokens for f in submitted.frames.frames(t.token_id, t.captures)]
                    await self.worker.send(reply_channel, chunk)
                finish = events[-1] if isinstance(events[-1], FinishEvent) else None
                if finish is not None:
                    finished = True
                    return self._done(finish, submitted.steering_label)
                await asyncio.sleep(max(0.0, CHUNK_INTERVAL_S - (time.monotonic() - sent_at)))
        finally:
            self.handles.pop(handle.request_id, None)
            if not finished:  # the reply channel broke or the process is stopping: free the batch row
                handle.cancel()
        return None

    def _token_dict(self, token: TokenEvent, with_logprobs: bool) -> dict[str, Any]:
        if not with_logprobs:
            return {"id": token.token_id, "text": token.text_delta}
        decode = self.runtime.loaded.tokenizer.decode
        return {"id": token.token_id, "text": decode([token.token_id]), "logprob": token.logprob,
                "top_logprobs": [{"text": decode([i]), "logprob": lp} for i, lp in token.top_logprobs or ()]}

    @staticmethod
    def _done(finish: FinishEvent, steering_label: str) -> dict[str, Any]:
        if finish.finish_reason == "error":
            return {"type": "error", "code": None, "status": 500, "error_type": "server_error",
                    "message": finish.error or "generation failed"}
        return {"type": "done", "finish_reason": finish.finish_reason, "steering": steering_label,
                "usage": {"prompt_tokens": finish.usage.prompt_tokens,
                          "completion_tokens": finish.usage.completion_tokens},
                "timings": {"queued_s": finish.timings.queued_s, "first_token_s": finish.timings.first_token_s,
                            "total_s": finish.timings.total_s}}
