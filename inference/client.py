"""The one way the web tier reaches the inference process: `inference_client()`, a method per call.

Each method sends its typed call (inference/messages.py) to the inference channel (any inference
process listening there may take it; a process's own channel for pings and cancels) and waits on a
reply channel of its own, within the call's timeout. An `error` reply becomes the MillmError for
its code; silence becomes INFERENCE_UNAVAILABLE (503). Generations stream: `generate` and
`collect` live in inference/generation_stream.py and use this client.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from channels.layers import get_channel_layer
from django.conf import settings
from pydantic import ValidationError

from inference import messages as m
from millm_site.errors import InferenceUnavailable, MillmError, error_for_code

R = TypeVar("R", bound=m.Message)

LOAD_TIMEOUT_S = 900.0  # a large model from a slow disk
ATTACH_TIMEOUT_S = 600.0
SHORT_TIMEOUT_S = 60.0  # unload, detach, set steering: quick unless the process is stuck
EMBED_TIMEOUT_S = 120.0


class InferenceClient:
    def __init__(self, *, channel: str | None = None) -> None:
        self._channel = channel  # None: settings.INFERENCE_CHANNEL, read at call time (tests override it)

    @property
    def channel(self) -> str:
        return self._channel or settings.INFERENCE_CHANNEL

    @property
    def layer(self):
        return get_channel_layer()

    async def call(self, call: m.Call, expected: type[R], *, timeout: float | None = None,
                   channel: str | None = None) -> R:
        """Send one call and return its reply, checked to be `expected`."""
        wait = settings.INFERENCE_TIMEOUT_S if timeout is None else timeout
        layer = self.layer
        try:
            # The default prefix matters: channels-redis runs one receive loop per layer, for one prefix, so a
            # reply channel with its own prefix would starve while a WebSocket consumer holds that loop.
            reply_channel = await layer.new_channel()
            await layer.send(channel or self.channel, call.model_copy(update={"reply_channel": reply_channel}).model_dump())
            raw = await asyncio.wait_for(layer.receive(reply_channel), wait)
        except TimeoutError:
            raise InferenceUnavailable(f"No inference process answered within {wait:g}s") from None
        except OSError as exc:  # redis-py's ConnectionError is an OSError subclass
            raise InferenceUnavailable(f"The message broker (REDIS_URL) is unreachable: {exc.__class__.__name__}") from None
        reply = reply_from(raw)
        if not isinstance(reply, expected):
            raise MillmError(f"The inference process answered {call.type} with {reply.type}")
        return reply

    async def send(self, call: m.Message, *, channel: str | None = None) -> None:
        """A call that gets no reply (cancel)."""
        await self.layer.send(channel or self.channel, call.model_dump())

    # --- one method per call -------------------------------------------------------------------

    async def ping(self, *, timeout: float | None = None, channel: str | None = None) -> m.Pong:
        return await self.call(m.Ping(), m.Pong, timeout=timeout, channel=channel)

    async def load_model(self, name: str, *, dtype: str | None = None, quantization: str | None = None) -> m.Loaded:
        return await self.call(m.LoadModel(model=name, dtype=dtype, quantization=quantization), m.Loaded,
                               timeout=LOAD_TIMEOUT_S)

    async def unload_model(self, name: str | None = None) -> m.Unloaded:
        return await self.call(m.UnloadModel(model=name), m.Unloaded, timeout=SHORT_TIMEOUT_S)

    async def attach_sae(self, name: str) -> m.Attached:
        return await self.call(m.AttachSae(sae=name), m.Attached, timeout=ATTACH_TIMEOUT_S)

    async def detach_sae(self, name: str | None = None) -> m.Detached:
        return await self.call(m.DetachSae(sae=name), m.Detached, timeout=SHORT_TIMEOUT_S)

    async def set_steering(self, steering: m.Steering) -> m.SteeringSet:
        return await self.call(m.SetSteering(steering=steering), m.SteeringSet, timeout=SHORT_TIMEOUT_S)

    async def configure_monitoring(self, *, enabled: bool | None = None, top_k: int | None = None,
                                   features: list[int] | None = None) -> m.MonitoringSettings:
        return await self.call(m.ConfigureMonitoring(enabled=enabled, top_k=top_k, features=features),
                               m.MonitoringSettings)

    async def statistics(self, *, top: int = 20, by: str = "mean") -> m.Statistics:
        return await self.call(m.GetStatistics(top=top, by=by), m.Statistics)

    async def reset_statistics(self) -> m.StatisticsReset:
        return await self.call(m.ResetStatistics(), m.StatisticsReset)

    async def embed(self, *, model: str | None, texts: list[str]) -> m.Embeddings:
        return await self.call(m.Embed(model=model, texts=texts), m.Embeddings, timeout=EMBED_TIMEOUT_S)

    async def cancel(self, *, request_id: str, channel: str) -> None:
        await self.send(m.Cancel(request_id=request_id), channel=channel)


def reply_from(raw: dict[str, Any]) -> m.AnyReply:
    """A received reply, validated; an `error` reply raises the MillmError for its code."""
    try:
        reply = m.parse_reply(raw)
    except ValidationError:
        raise MillmError("The inference process sent a malformed reply; see the inference log") from None
    if isinstance(reply, m.Error):
        raise error_for_code(reply.code, reply.message, status=reply.status, param=reply.param, details=reply.details)
    return reply


_client = InferenceClient()


def inference_client() -> InferenceClient:
    return _client
