"""Serving /v1: resolve the model (and profile), run the request in the inference process
(inference/generation_stream.py), and shape what comes back as OpenAI responses or an SSE stream.
Domain errors become OpenAI's error shape in one place, `openai_error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async

from catalog.models import LanguageModel
from inference import generation_stream
from inference.generation_stream import GenerationReply
from inference.messages import Chunk, Done, ReturnFeatures, Steering, Token
from millm_site import shutdown
from millm_site.errors import InferenceUnavailable, MillmError
from monitoring.live import activation_publisher
from monitoring.request_tracking import RequestTracker
from profiles.models import Profile
from profiles.vector_services import vector_parts
from serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequestError,
    new_id,
    now,
    usage_body,
)
from steering.sae_addressing import (
    attached_saes_in_order,
    features_fill_recommended_by_sae,
    strengths_to_raw_by_sae,
)
from steering.steering_options import SteeringOptions, steering_options_resolve
from steering.steering_services import attached_sae, steering_message

# OpenAI's codes where they differ from ours in more than case.
_OPENAI_CODES: dict[str, str | None] = {"INFERENCE_UNAVAILABLE": "service_unavailable", "INTERNAL_ERROR": None}


def openai_error(exc: MillmError) -> OpenAIRequestError:
    """The one mapping from a domain error (ours or the engine's, via the inference process) to /v1's shape."""
    return OpenAIRequestError(exc.message, param=exc.param, code=_OPENAI_CODES.get(exc.code, exc.code.lower()),
                              status=exc.status, type="server_error" if exc.status >= 500 else "invalid_request_error")


@dataclass
class Target:
    model: LanguageModel
    profile: Profile | None


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


def _steering_payload(target: Target, inline: Any) -> Steering | None:
    """Which steering the request asks for: inline beats a profile in the model name beats the active one (None)."""
    if inline is not None:
        features = [f.model_dump() for f in inline.features]
        if inline.until_concept and not features:
            raise OpenAIRequestError("steering.until_concept: the steered features' concept tokens end it; list "
                                     "at least one feature", param="steering.until_concept")
        sae = attached_sae()
        try:
            options = steering_options_resolve(sae=sae, mode=inline.mode, positions=inline.positions,
                                               units=inline.units, layers=inline.layers, direction=inline.direction,
                                               preset=inline.preset, max_steered_tokens=inline.max_steered_tokens,
                                               until_concept=inline.until_concept)
            if any(f["strength"] is None for f in features):  # the calibrated strength of its own SAE
                if sae is None:
                    raise OpenAIRequestError("steering: no SAE is attached", param="steering", code="sae_not_attached")
                features = features_fill_recommended_by_sae(sae=sae, features=features, units=options.units,
                                                            attached=attached_saes_in_order())
            if options.units != "raw" and features:
                if sae is None:
                    raise OpenAIRequestError("steering: no SAE is attached", param="steering", code="sae_not_attached")
                features = strengths_to_raw_by_sae(sae=sae, features=features, units=options.units,
                                                   attached=attached_saes_in_order())
            # Raw vectors or stored ones by name, checked against the requested model's width and layers.
            vectors = vector_parts([v.model_dump(exclude_none=True) for v in inline.vectors], model=target.model)
        except MillmError as exc:
            field = exc.details.get("field", "units")
            raise OpenAIRequestError(exc.message, param=f"steering.{field}") from None
        return steering_message(features, options, vectors=vectors)
    if target.profile is not None:
        profile = target.profile
        options = SteeringOptions(mode=profile.mode, positions=profile.positions, units="raw",
                                  layers=tuple(profile.layers or ()), direction=profile.direction,
                                  max_steered_tokens=profile.max_steered_tokens, until_concept=profile.until_concept)
        try:
            vectors = vector_parts(list(profile.vectors or []), model=target.model)
        except MillmError as exc:
            raise OpenAIRequestError(f"profile {profile.name}: {exc.message}", param="model") from None
        features = [{"index": f.index, "strength": f.strength, **({"sae": f.sae} if f.sae else {}),
                     **({"when": f.when} if f.when else {})}
                    for f in profile.features.all()]
        return steering_message(features, options, label=f"profile:{profile.name}",
                                abort_when=list(profile.abort_when or []), vectors=vectors)
    return None


steering_payload = sync_to_async(_steering_payload)


def chat_logprobs(tokens: list[Token]) -> dict[str, Any]:
    return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
                         "top_logprobs": [{"token": alt.text, "logprob": alt.logprob,
                                           "bytes": list(alt.text.encode())} for alt in t.top_logprobs or ()]}
                        for t in tokens],
            "refusal": None}


def completion_logprobs(tokens: list[Token]) -> dict[str, Any]:
    offsets, position = [], 0
    for t in tokens:
        offsets.append(position)
        position += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{alt.text: alt.logprob for alt in t.top_logprobs or ()} for t in tokens],
            "text_offset": offsets}


async def _start(req: ChatCompletionRequest | CompletionRequest, *, endpoint: str, prompt: str | None,
                 messages: list | None) -> tuple[AsyncIterator[GenerationReply], RequestTracker]:
    """What chat and text completions share: refuse the unsupported, resolve, steer, start generating."""
    req.refuse_unsupported()
    target = await resolve_target(req.model)
    steering = await steering_payload(target, req.steering)
    if steering is not None and req.steering is not None and req.steering.abort_when:
        steering = Steering(**{**steering.model_dump(), "abort_when": [c.model_dump() for c in req.steering.abort_when]})
    tracker = RequestTracker(endpoint=endpoint, model=target.model.name,
                             profile=target.profile.name if target.profile else "")
    features = ReturnFeatures(**req.return_features.model_dump()) if req.return_features is not None else None
    stream = generation_stream.generate(model=target.model.name, prompt=prompt, messages=messages,
                                        params=req.params(), steering=steering, features=features, observer=tracker,
                                        on_frames=activation_publisher().offer)
    return stream, tracker


async def chat_completion(req: ChatCompletionRequest) -> tuple[dict | AsyncIterator[str], dict[str, str]]:
    """Returns (body or SSE line iterator, response headers: X-miLLM-Steering, X-Request-Id)."""
    stream, tracker = await _start(req, endpoint="chat.completions", prompt=None, messages=req.chat_messages())
    if req.stream:
        first = await anext(stream)  # errors before the first byte still get a proper status code
        return _chat_sse(req, stream), _headers(first.steering, tracker)
    result = await generation_stream.collect(stream)
    body = {
        "id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": req.model,
        "choices": [{"index": 0, "finish_reason": result.finish_reason,
                     "message": {"role": "assistant", "content": result.text, "refusal": None},
                     "logprobs": chat_logprobs(result.tokens) if req.logprobs else None}],
        "usage": usage_body(result.prompt_tokens, result.completion_tokens),
    }
    return _with_features(body, req, result), _headers(result.steering, tracker, result.abort)


async def text_completion(req: CompletionRequest) -> tuple[dict | AsyncIterator[str], dict[str, str]]:
    stream, tracker = await _start(req, endpoint="completions", prompt=req.prompt, messages=None)
    if req.stream:
        first = await anext(stream)
        return _completion_sse(req, stream), _headers(first.steering, tracker)
    result = await generation_stream.collect(stream)
    body = {
        "id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": req.model,
        "choices": [{"index": 0, "text": result.text, "finish_reason": result.finish_reason,
                     "logprobs": completion_logprobs(result.tokens) if req.logprobs is not None else None}],
        "usage": usage_body(result.prompt_tokens, result.completion_tokens),
    }
    return _with_features(body, req, result), _headers(result.steering, tracker, result.abort)


def _with_features(body: dict, req: ChatCompletionRequest | CompletionRequest, result: Any) -> dict:
    """`millm_steering`: which steering ran (as X-miLLM-Steering and a stream's last chunk say); `millm_features`
    only when the request asked (return_features), `millm_abort` only when an abort condition ended the
    generation: an OpenAI client ignores these keys."""
    body["millm_steering"] = result.steering
    if result.abort is not None:
        body["millm_abort"] = result.abort
    if req.return_features is not None:
        body["millm_features"] = result.features or {"sae": req.return_features.sae, "tokens": []}
    return body


def _headers(steering_label: str, tracker: RequestTracker, abort: dict | None = None) -> dict[str, str]:
    """Which steering ran, the id under which the request is in the history, and (X-miLLM-Abort) the
    abort condition that ended it: `index=101; value=5.31; position=12`."""
    headers = {"X-miLLM-Steering": steering_label, "X-Request-Id": tracker.request_id}
    if abort is not None:
        headers["X-miLLM-Abort"] = f"index={abort['index']}; value={abort['value']}; position={abort['position']}"
    return headers


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _sse_stream(base: dict, stream: AsyncIterator[GenerationReply], *, include_usage: bool, first: list[dict],
                      chunk_choice, final_choice) -> AsyncIterator[str]:
    """The SSE framing both completions share: choices per chunk, a final chunk with the finish reason
    (and which steering ran), an optional usage chunk, an error event if the generation fails, [DONE]."""
    for chunk in first:
        yield _sse({**base, **chunk})
    try:
        async for message in _until_shutdown(stream):
            if isinstance(message, Chunk) and (message.text or message.features):
                # return_features: each chunk carries the features of the tokens it brings
                extra = {"millm_features": message.features} if message.features is not None else {}
                yield _sse({**base, "choices": [chunk_choice(message)], **extra})
            elif isinstance(message, Done):
                abort = {"millm_abort": message.abort} if message.abort is not None else {}
                yield _sse({**base, "choices": [final_choice(message)], "millm_steering": message.steering, **abort})
                if include_usage:
                    usage = message.usage
                    yield _sse({**base, "choices": [],
                                "usage": usage_body(usage.prompt_tokens, usage.completion_tokens)})
    except MillmError as exc:
        yield _sse(openai_error(exc).body())
    yield _sse("[DONE]")


async def _until_shutdown(stream: AsyncIterator[GenerationReply]) -> AsyncIterator[GenerationReply]:
    """The stream's replies until the web process starts stopping (millm_site/shutdown.py); then the
    generation is abandoned (its inference process is told to cancel) and INFERENCE_UNAVAILABLE raised,
    so the client gets an error event and [DONE] instead of a connection cut mid-way."""
    stopping = asyncio.ensure_future(shutdown.wait())
    step: asyncio.Future | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(stream))
            await asyncio.wait({step, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                raise InferenceUnavailable(shutdown.SHUTDOWN_MESSAGE)
            try:
                reply = step.result()
            except StopAsyncIteration:
                return
            yield reply
    finally:
        # Whatever ends this (shutdown, the client leaving, an error), the generation is closed now, not
        # at garbage collection: closing it cancels its batch row in the inference process.
        stopping.cancel()
        if step is not None and not step.done():
            step.cancel()
            with contextlib.suppress(BaseException):
                await step
        with contextlib.suppress(Exception):
            await stream.aclose()  # type: ignore[attr-defined]


def _include_usage(req: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def _chat_sse(req: ChatCompletionRequest, stream: AsyncIterator[GenerationReply]) -> AsyncIterator[str]:
    base = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": now(), "model": req.model}
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                         "logprobs": None}]}
    return _sse_stream(
        base, stream, include_usage=_include_usage(req), first=[role],
        chunk_choice=lambda m: {"index": 0, "delta": {"content": m.text}, "finish_reason": None,
                                "logprobs": chat_logprobs(m.tokens) if req.logprobs else None},
        final_choice=lambda m: {"index": 0, "delta": {}, "finish_reason": m.finish_reason, "logprobs": None})


def _completion_sse(req: CompletionRequest, stream: AsyncIterator[GenerationReply]) -> AsyncIterator[str]:
    base = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": req.model}
    return _sse_stream(
        base, stream, include_usage=_include_usage(req), first=[],
        chunk_choice=lambda m: {"index": 0, "text": m.text, "finish_reason": None,
                                "logprobs": completion_logprobs(m.tokens) if req.logprobs is not None else None},
        final_choice=lambda m: {"index": 0, "text": "", "finish_reason": m.finish_reason, "logprobs": None})


