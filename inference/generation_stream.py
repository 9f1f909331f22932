"""One generation from the web tier's side: send `generate`, yield the typed replies, cancel if abandoned.

The inference process answers on the reply channel with `Started` (its own channel, for cancel and
pings), any number of `Chunk`, then `Done` or `Error`. Failures raise MillmErrors (the code the
engine gave, or INFERENCE_UNAVAILABLE when the process is gone); each surface maps them once
(/v1 to OpenAI's shape, /api to the envelope).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from django.conf import settings

from inference import messages as m
from inference import registry
from inference.client import InferenceClient, inference_client, reply_from
from millm_site.errors import InferenceUnavailable, MillmError

LIVENESS_CHECK_S = 1.0  # silence on a running generation after which its process is pinged
LIVENESS_TIMEOUT_S = 3.0  # no pong within this: the process is gone
LEASE_S = 5.0  # the inference process cancels a generation whose lease was not renewed for this long
LEASE_RENEW_S = 1.0
STOPPED_MESSAGE = ("The inference process stopped this generation before it finished (it is shutting down or "
                   "the model was unloaded); retry the request")

GenerationReply = m.Started | m.Chunk | m.Done


class GenerationObserver(Protocol):
    """What watches a generation (monitoring.request_tracking.RequestTracker): sees every raw reply, hears
    the outcome once."""

    request_id: str
    params: dict[str, Any]
    steering: dict[str, Any]
    prompt: str

    def see(self, message: dict[str, Any]) -> None: ...

    async def finish(self, status: str, error: str = "") -> None: ...


FramesSink = Callable[[list[dict[str, Any]]], Awaitable[Any]]


@dataclass
class Generation:
    """What one finished generation produced, gathered from the reply stream."""

    text: str = ""
    tokens: list[m.Token] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)  # per-token features, when monitored
    features: dict[str, Any] | None = None  # the request's own features (return_features): {sae, tokens}
    abort: dict[str, Any] | None = None  # the abort condition that ended it (finish_reason content_filter)
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    steering: str = "none"


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:24]}"


async def _worker_alive(client: InferenceClient, worker_channel: str) -> bool:
    """Ping the process running our generation on its own channel: silence is normal, death is not."""
    try:
        await client.ping(channel=worker_channel, timeout=LIVENESS_TIMEOUT_S)
    except InferenceUnavailable:
        return False
    return True


async def _renew_lease(client: InferenceClient, worker_channel: str, request_id: str) -> None:
    """While this task lives the requester listens; it dies with the generator (client gone, 503, crash)."""
    lease = m.Lease(request_ids=[request_id])
    while True:
        await asyncio.sleep(LEASE_RENEW_S)
        with contextlib.suppress(Exception):  # Redis away: the liveness ping reports it; the lease lapses
            await client.send(lease, channel=worker_channel)


async def _answer_wait(client: InferenceClient, model: str) -> float:
    """How long to wait for `started`: MILLM_INFERENCE_TIMEOUT, or the start bound while no process serves
    the model yet but one is on record (restoring its model) or is expected (`serve` is starting one)."""
    if model in await client._routes():  # the usual case: no extra Redis round trip
        return settings.INFERENCE_TIMEOUT_S
    try:
        records = await registry.processes_live()
    except Exception:
        return settings.INFERENCE_TIMEOUT_S
    starting = (records and not any(r.loaded_model == model for r in records)) or (
        not records and settings.INFERENCE_EXPECTED)
    if starting:
        return max(settings.INFERENCE_TIMEOUT_S, settings.INFERENCE_START_TIMEOUT_S)
    return settings.INFERENCE_TIMEOUT_S


async def _still_served(model: str) -> bool:
    try:
        return any(r.loaded_model == model for r in await registry.processes_live())
    except Exception:
        return False


async def generate(*, model: str, prompt: str | None, messages: list | None, params: dict[str, Any],
                   steering: m.Steering | None, monitor: bool | None = None,
                   features: m.ReturnFeatures | None = None, observer: GenerationObserver | None = None, on_frames: FramesSink | None = None,
                   client: InferenceClient | None = None) -> AsyncIterator[GenerationReply]:
    """Yield the inference process's replies for one generation; cancel it if abandoned.

    `steering` None runs the active steering. A receive is never cancelled mid-flight (that could drop
    a message): it is awaited in slices, and after a silent slice the process running the generation
    is pinged, so a crash mid-stream becomes a clean 503 within seconds instead of a hang.
    """
    client = client or inference_client()
    layer = client.layer
    call = m.Generate(request_id=observer.request_id if observer and observer.request_id else new_request_id(),
                      model=model, prompt=prompt, messages=messages, params=params, steering=steering,
                      monitor=monitor, features=features, lease_s=LEASE_S)
    request_id = call.request_id
    if observer is not None:
        observer.request_id, observer.params = request_id, params
        # The history keeps the shape it always had: {"source": label, features, mode, positions}.
        observer.steering = ({"source": steering.label, **steering.model_dump(exclude={"label", "vectors"}),
                              **_vectors_summary(steering)} if steering is not None else {"source": "active"})
        observer.prompt = prompt if prompt is not None else json.dumps(messages)

    async def fail(status: str, message: str) -> None:
        if observer is not None:
            await observer.finish(status, message)

    try:
        answer_wait = await _answer_wait(client, model)
        reply_channel = await layer.new_channel()
        await layer.send(await client.channel_for_model(model),
                         call.model_copy(update={"reply_channel": reply_channel}).model_dump())
    except OSError:
        await fail("error", "the message broker is unreachable")
        raise InferenceUnavailable("The message broker is unreachable") from None
    worker_channel: str | None = None
    finished = False
    pending: asyncio.Future | None = None
    lease: asyncio.Task | None = None
    silent_s = 0.0
    try:
        while True:
            pending = pending or asyncio.ensure_future(layer.receive(reply_channel))
            done, _ = await asyncio.wait({pending}, timeout=LIVENESS_CHECK_S)
            if not done:
                silent_s += LIVENESS_CHECK_S
                if worker_channel is None and silent_s >= answer_wait and await _still_served(model):
                    # A busy process that keeps its heartbeat is alive: a burst of requests is not an outage.
                    answer_wait = min(silent_s + settings.INFERENCE_TIMEOUT_S,
                                      max(settings.INFERENCE_TIMEOUT_S, settings.INFERENCE_START_TIMEOUT_S))
                if worker_channel is None and silent_s >= answer_wait:
                    await fail("error", "no inference process answered")
                    raise InferenceUnavailable("No inference process answered in time")
                if worker_channel is not None and not await _worker_alive(client, worker_channel):
                    await fail("error", "the inference process stopped")
                    raise InferenceUnavailable("The inference process stopped during the generation; retry the request")
                continue
            raw, pending, silent_s = pending.result(), None, 0.0
            try:
                reply = reply_from(raw)
            except MillmError as exc:
                finished = True
                await fail("error", exc.message)
                raise
            if not isinstance(reply, GenerationReply):
                finished = True
                await fail("error", f"unexpected {reply.type} reply")
                raise MillmError(f"The inference process answered generate with {reply.type}")
            if observer is not None:
                observer.see(raw)
            if isinstance(reply, m.Started):
                worker_channel = reply.worker_channel
                lease = asyncio.ensure_future(_renew_lease(client, worker_channel, request_id))
            elif isinstance(reply, m.Chunk) and reply.frames and on_frames is not None:
                for frame in reply.frames:
                    frame["request_id"] = request_id
                await on_frames(list(reply.frames))
            elif isinstance(reply, m.Done):
                finished = True
                if reply.finish_reason == "cancelled":
                    # Not by this requester, who is still reading: the inference process stopped the
                    # generation (it is shutting down, or the model was unloaded). A cut answer is not
                    # an answer: the client gets a 503 (an error event in a stream), never a short 200.
                    await fail("error", "the inference process stopped the generation")
                    raise InferenceUnavailable(STOPPED_MESSAGE)
                if observer is not None:
                    await observer.finish("completed")
            yield reply
            if finished:
                return
    finally:
        if pending is not None:
            pending.cancel()
        if lease is not None:
            lease.cancel()
        if not finished:
            await fail("cancelled", "the client went away")
            if worker_channel is not None:  # free the batch row
                await client.cancel(request_id=request_id, channel=worker_channel)


async def collect(stream: AsyncIterator[GenerationReply]) -> Generation:
    result = Generation()
    pieces: list[str] = []
    async for reply in stream:
        if isinstance(reply, m.Chunk):
            pieces.append(reply.text)
            result.tokens.extend(reply.tokens)
            result.frames.extend(reply.frames or ())
            if reply.features is not None:
                if result.features is None:
                    result.features = {"sae": reply.features.get("sae"), "tokens": []}
                result.features["tokens"].extend(reply.features.get("tokens", ()))
        elif isinstance(reply, m.Started):
            result.prompt_tokens = reply.prompt_tokens
        elif isinstance(reply, m.Done):
            result.finish_reason = reply.finish_reason
            result.prompt_tokens = reply.usage.prompt_tokens
            result.completion_tokens = reply.usage.completion_tokens
            result.steering = reply.steering
            result.abort = reply.abort
    result.text = "".join(pieces)
    return result


def _vectors_summary(steering: m.Steering) -> dict[str, Any]:
    """A steering's vectors as the history keeps them: layer, strength, name and norm, not d_model numbers each."""
    if not steering.vectors:
        return {}
    return {"vectors": [{"layer": p.layer, "strength": p.strength, "name": p.name,
                         "norm": round(math.sqrt(sum(v * v for v in p.values)), 6)} for p in steering.vectors]}
