"""The one way the web tier reaches the inference process: request/reply over the channel layer.

The web tier sends `{"type": kind, "reply_channel": ..., **payload}` to the named inference
channel (any inference process listening there may take it) and waits on its own reply channel.
"""

from __future__ import annotations

import asyncio
from typing import Any

from channels.layers import get_channel_layer
from django.conf import settings

from millm_site.errors import InferenceUnavailable, MillmError


async def inference_call(kind: str, payload: dict[str, Any] | None = None, *, timeout: float | None = None) -> dict:
    layer = get_channel_layer()
    wait = settings.INFERENCE_TIMEOUT_S if timeout is None else timeout
    try:
        # The default prefix matters: channels-redis runs one receive loop per layer, for one prefix, so a
        # reply channel with its own prefix would starve while a WebSocket consumer holds that loop.
        reply_channel = await layer.new_channel()
        await layer.send(settings.INFERENCE_CHANNEL, {"type": kind, "reply_channel": reply_channel, **(payload or {})})
        reply = await asyncio.wait_for(layer.receive(reply_channel), wait)
    except TimeoutError:
        raise InferenceUnavailable(f"No inference process answered within {wait:g}s") from None
    except OSError as exc:  # redis-py's ConnectionError is an OSError subclass
        raise InferenceUnavailable(f"The message broker (REDIS_URL) is unreachable: {exc.__class__.__name__}") from None
    if reply.get("type") == "error":
        raise _error_from_reply(reply)
    return reply


def _error_from_reply(reply: dict) -> MillmError:
    error = MillmError(reply.get("message", "inference error"), details=reply.get("details"))
    error.code = reply.get("code", MillmError.code)
    error.status = int(reply.get("status", MillmError.status))
    return error
