"""Serving /v1: resolve the model (and profile), run the request in the inference process, and
shape what comes back as OpenAI responses or an SSE stream.

The inference process answers a `generate` call on the reply channel with, in order: `started`
(its own channel, for cancel), any number of `chunk` (text delta + tokens, coalesced), then `done`
(finish reason, usage, steering applied) or `error`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from catalog.models import LanguageModel
from millm_site.errors import MillmError
from monitoring.live import activation_publisher
from monitoring.request_tracking import RequestTracker
from profiles.models import Profile
from serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequestError,
    new_id,
    now,
    usage_body,
)
from steering.steering_services import attached_sae
from steering.units import strengths_to_raw

LIVENESS_CHECK_S = 1.0  # silence on a running generation after which its process is pinged
LIVENESS_TIMEOUT_S = 3.0  # no pong within this: the process is gone


@dataclass
class Target:
    model: LanguageModel
    profile: Profile | None


@dataclass
class Generation:
    """What one finished generation produced, gathered from the reply stream."""

    text: str = ""
    tokens: list[dict[str, Any]] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)  # per-token features, when monitored
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    steering: str = "none"


def _resolve_target(name: str) -> Target:
    model_name, _, profile_name = name.partition(":")
    model = LanguageModel.objects.filter(name=model_name).first()
    if model is None:
        raise OpenAIRequestError(f"The model '{name}' does not exist", param="model", code="model_not_found",
                                 status=404)
    profile = None
    if profile_name:
        profile = Profile.objects.filter(name=profile_name).prefetch_related("features").first()
        if profile is None:
            raise OpenAIRequestError(f"No steering profile named '{profile_name}'", param="model",
                                     code="model_not_found", status=404)
    return Target(model=model, profile=profile)


resolve_target = sync_to_async(_resolve_target)


def _steering_payload(target: Target, inline: Any) -> dict[str, Any]:
    """Which steering the request asks for: inline beats a profile in the model name beats the active one."""
    if inline is not None:
        features = [f.model_dump() for f in inline.features]
        if inline.units != "raw" and features:
            sae = attached_sae()
            if sae is None:
                raise OpenAIRequestError("steering: no SAE is attached", param="steering", code="sae_not_attached")
            try:
                features = strengths_to_raw(sae=sae, features=features, units=inline.units)
            except MillmError as exc:
                raise OpenAIRequestError(exc.message, param="steering.units") from None
        return {"source": "inline", "features": features, "mode": inline.mode, "positions": inline.positions}
    if target.profile is not None:
        profile = target.profile
        return {"source": f"profile:{profile.name}", "mode": profile.mode, "positions": profile.positions,
                "features": [{"index": f.index, "strength": f.strength} for f in profile.features.all()]}
    return {"source": "active"}


steering_payload = sync_to_async(_steering_payload)


def _unavailable(message: str) -> OpenAIRequestError:
    return OpenAIRequestError(message, code="service_unavailable", status=503, type="server_error")


async def _worker_alive(layer, worker_channel: str) -> bool:
    """Ping the process running our generation on its own channel: silence is normal, death is not."""
    reply_channel = await layer.new_channel()
    await layer.send(worker_channel, {"type": "ping", "reply_channel": reply_channel})
    pong = asyncio.ensure_future(layer.receive(reply_channel))
    done, _ = await asyncio.wait({pong}, timeout=LIVENESS_TIMEOUT_S)
    if not done:
        pong.cancel()
    return bool(done)


async def run_generation(*, model: str, prompt: str | None, messages: list | None, params: dict,
                         steering: dict, monitor: bool | None = None,
                         tracker: RequestTracker | None = None) -> AsyncIterator[dict]:
    """Yield the inference process's reply messages for one generation; cancel it if abandoned.

    A receive is never cancelled mid-flight (that could drop a message): it is awaited in slices,
    and after a silent slice the process running the generation is pinged, so a crash mid-stream
    becomes a clean 503 within seconds instead of a hang.
    """
    layer = get_channel_layer()
    request_id = new_id("req")
    tracker = tracker or RequestTracker(endpoint="internal", model=model)
    tracker.request_id = request_id
    tracker.params = params
    tracker.steering = steering
    tracker.prompt = prompt if prompt is not None else json.dumps(messages)
    worker_channel = None
    try:
        reply_channel = await layer.new_channel()
        await layer.send(settings.INFERENCE_CHANNEL, {
            "type": "generate", "request_id": request_id, "reply_channel": reply_channel, "model": model,
            "prompt": prompt, "messages": messages, "params": params, "steering": steering, "monitor": monitor,
        })
    except OSError:
        await tracker.finish("error", "the message broker is unreachable")
        raise _unavailable("The message broker is unreachable") from None
    finished = False
    pending: asyncio.Future | None = None
    silent_s = 0.0
    try:
        while True:
            pending = pending or asyncio.ensure_future(layer.receive(reply_channel))
            done, _ = await asyncio.wait({pending}, timeout=LIVENESS_CHECK_S)
            if not done:
                silent_s += LIVENESS_CHECK_S
                if worker_channel is None and silent_s >= settings.INFERENCE_TIMEOUT_S:
                    await tracker.finish("error", "no inference process answered")
                    raise _unavailable("No inference process answered in time")
                if worker_channel is not None and not await _worker_alive(layer, worker_channel):
                    await tracker.finish("error", "the inference process stopped")
                    raise _unavailable("The inference process stopped during the generation; retry the request")
                continue
            message, pending, silent_s = pending.result(), None, 0.0
            tracker.see(message)
            kind = message["type"]
            if kind == "chunk" and message.get("frames"):
                for frame in message["frames"]:
                    frame["request_id"] = request_id
                await activation_publisher().offer(list(message["frames"]))
            if kind == "started":
                worker_channel = message["worker_channel"]
            elif kind == "error":
                finished = True
                await tracker.finish("error", message.get("message", ""))
                raise OpenAIRequestError(message.get("message", "generation failed"), param=message.get("param"),
                                         code=message.get("code"), status=int(message.get("status", 500)),
                                         type=message.get("error_type", "invalid_request_error"))
            if kind == "done":
                finished = True
                await tracker.finish("completed")
            yield message
            if finished:
                return
    finally:
        if pending is not None:
            pending.cancel()
        if not finished:
            await tracker.finish("cancelled", "the client went away")
            if worker_channel is not None:  # free the batch row
                await layer.send(worker_channel, {"type": "cancel", "request_id": request_id})


async def collect(stream: AsyncIterator[dict]) -> Generation:
    result = Generation()
    pieces: list[str] = []
    async for message in stream:
        if message["type"] == "chunk":
            pieces.append(message["text"])
            result.tokens.extend(message.get("tokens", ()))
            result.frames.extend(message.get("frames", ()))
        elif message["type"] == "started":
            result.prompt_tokens = message.get("prompt_tokens", 0)
        elif message["type"] == "done":
            result.finish_reason = message["finish_reason"]
            result.prompt_tokens = message["usage"]["prompt_tokens"]
            result.completion_tokens = message["usage"]["completion_tokens"]
            result.steering = message.get("steering", "none")
    result.text = "".join(pieces)
    return result


def chat_logprobs(tokens: list[dict]) -> dict[str, Any]:
    return {"content": [{"token": t["text"], "logprob": t["logprob"], "bytes": list(t["text"].encode()),
                         "top_logprobs": [{"token": alt["text"], "logprob": alt["logprob"],
                                           "bytes": list(alt["text"].encode())} for alt in t.get("top_logprobs", [])]}
                        for t in tokens],
            "refusal": None}


def completion_logprobs(tokens: list[dict]) -> dict[str, Any]:
    offsets, position = [], 0
    for t in tokens:
        offsets.append(position)
        position += len(t["text"])
    return {"tokens": [t["text"] for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": [{alt["text"]: alt["logprob"] for alt in t.get("top_logprobs", [])} for t in tokens],
            "text_offset": offsets}


async def _start(req: ChatCompletionRequest | CompletionRequest, *, endpoint: str, prompt: str | None,
                 messages: list | None) -> tuple[AsyncIterator[dict], RequestTracker]:
    """What chat and text completions share: refuse the unsupported, resolve, steer, start generating."""
    req.refuse_unsupported()
    target = await resolve_target(req.model)
    steering = await steering_payload(target, req.steering)
    tracker = RequestTracker(endpoint=endpoint, model=target.model.name,
                             profile=target.profile.name if target.profile else "")
    stream = run_generation(model=target.model.name, prompt=prompt, messages=messages, params=req.params(),
                            steering=steering, tracker=tracker)
    return stream, tracker


async def chat_completion(req: ChatCompletionRequest) -> tuple[dict | AsyncIterator[str], dict[str, str]]:
    """Returns (body or SSE line iterator, response headers: X-miLLM-Steering, X-Request-Id)."""
    stream, tracker = await _start(req, endpoint="chat.completions", prompt=None, messages=req.chat_messages())
    if req.stream:
        first = await anext(stream)  # errors before the first byte still get a proper status code
        return _chat_sse(req, first, stream), _headers(first.get("steering", "none"), tracker)
    result = await collect(stream)
    body = {
        "id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": req.model,
        "choices": [{"index": 0, "finish_reason": result.finish_reason,
                     "message": {"role": "assistant", "content": result.text, "refusal": None},
                     "logprobs": chat_logprobs(result.tokens) if req.logprobs else None}],
        "usage": usage_body(result.prompt_tokens, result.completion_tokens),
    }
    return body, _headers(result.steering, tracker)


async def text_completion(req: CompletionRequest) -> tuple[dict | AsyncIterator[str], dict[str, str]]:
    stream, tracker = await _start(req, endpoint="completions", prompt=req.prompt, messages=None)
    if req.stream:
        first = await anext(stream)
        return _completion_sse(req, first, stream), _headers(first.get("steering", "none"), tracker)
    result = await collect(stream)
    body = {
        "id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": req.model,
        "choices": [{"index": 0, "text": result.text, "finish_reason": result.finish_reason,
                     "logprobs": completion_logprobs(result.tokens) if req.logprobs is not None else None}],
        "usage": usage_body(result.prompt_tokens, result.completion_tokens),
    }
    return body, _headers(result.steering, tracker)


def _headers(steering_label: str, tracker: RequestTracker) -> dict[str, str]:
    """Which steering ran, and the id under which the request is in the history."""
    return {"X-miLLM-Steering": steering_label, "X-Request-Id": tracker.request_id}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _sse_stream(base: dict, stream: AsyncIterator[dict], *, include_usage: bool, first: list[dict],
                      chunk_choice, final_choice) -> AsyncIterator[str]:
    """The SSE framing both completions share: choices per chunk, a final chunk with the finish reason
    (and which steering ran), an optional usage chunk, an error event if the generation fails, [DONE]."""
    for chunk in first:
        yield _sse({**base, **chunk})
    try:
        async for message in stream:
            if message["type"] == "chunk" and message["text"]:
                yield _sse({**base, "choices": [chunk_choice(message)]})
            elif message["type"] == "done":
                yield _sse({**base, "choices": [final_choice(message)], "millm_steering": message.get("steering", "none")})
                if include_usage:
                    usage = message["usage"]
                    yield _sse({**base, "choices": [],
                                "usage": usage_body(usage["prompt_tokens"], usage["completion_tokens"])})
    except OpenAIRequestError as exc:
        yield _sse(exc.body())
    yield _sse("[DONE]")


def _include_usage(req: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def _chat_sse(req: ChatCompletionRequest, started: dict, stream: AsyncIterator[dict]) -> AsyncIterator[str]:
    base = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": now(), "model": req.model}
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                         "logprobs": None}]}
    return _sse_stream(
        base, stream, include_usage=_include_usage(req), first=[role],
        chunk_choice=lambda m: {"index": 0, "delta": {"content": m["text"]}, "finish_reason": None,
                                "logprobs": chat_logprobs(m.get("tokens", [])) if req.logprobs else None},
        final_choice=lambda m: {"index": 0, "delta": {}, "finish_reason": m["finish_reason"], "logprobs": None})


def _completion_sse(req: CompletionRequest, started: dict, stream: AsyncIterator[dict]) -> AsyncIterator[str]:
    base = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": req.model}
    return _sse_stream(
        base, stream, include_usage=_include_usage(req), first=[],
        chunk_choice=lambda m: {"index": 0, "text": m["text"], "finish_reason": None,
                                "logprobs": completion_logprobs(m.get("tokens", [])) if req.logprobs is not None
                                else None},
        final_choice=lambda m: {"index": 0, "text": "", "finish_reason": m["finish_reason"], "logprobs": None})


