"""The one way the web tier reaches the inference process: `inference_client()`, a method per call.

Each method sends its typed call (inference/messages.py) and waits on a reply channel of its own,
within the call's timeout. An `error` reply becomes the MillmError for its code; silence becomes
INFERENCE_UNAVAILABLE (503). Three routes:
- management calls that change state (load, attach, steering, monitoring) are broadcast to every
  inference process through the control group; each acknowledges receipt at once, then answers, and
  the method returns a `Fanout`: the first process's reply plus which processes applied it, skipped
  it (pinned to another model), failed or did not answer. With no live process on record (one is
  still starting) the call goes to the shared channel instead and waits for whichever starts first;
- generations and embeddings go to the own channel of the least busy live process serving their
  model (`channel_for_model`);
- pings, statistics and cancels go to the shared channel or a process's own channel.
Generations stream: `generate` and `collect` live in inference/generation_stream.py.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from channels.layers import get_channel_layer
from django.conf import settings
from pydantic import ValidationError
from redis.exceptions import RedisError

from inference import messages as m
from inference import registry
from millm_site.errors import Conflict, InferenceUnavailable, MillmError, error_for_code

R = TypeVar("R", bound=m.Message)

LOAD_TIMEOUT_S = 900.0  # a large model from a slow disk
ATTACH_TIMEOUT_S = 600.0
SHORT_TIMEOUT_S = 60.0  # unload, detach, set steering: quick unless the process is stuck
EMBED_TIMEOUT_S = 120.0
SCORE_TIMEOUT_S = 120.0  # token diffs and sweep scores (teacher forcing, many texts on a CPU)
RECEIPT_WINDOW_S = 2.0  # a process on record that has not acknowledged a broadcast by then is gone
ROUTES_TTL_S = 1.0  # how long a web process reuses its view of which process serves which model


@dataclass(frozen=True)
class Fanout(Generic[R]):
    """A broadcast call's outcome: one applied reply, and what every process did with the call."""

    reply: R
    applied: list[str] = field(default_factory=list)  # process ids
    skipped: list[str] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)  # {process_id, code, message}
    no_answer: list[str] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        return {"applied": self.applied, "skipped": self.skipped, "failed": self.failed, "no_answer": self.no_answer}


class InferenceClient:
    def __init__(self, *, channel: str | None = None) -> None:
        self._channel = channel  # None: settings.INFERENCE_CHANNEL, read at call time (tests override it)
        self._records_cache: tuple[float, list[registry.ProcessRecord]] | None = None

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

    async def broadcast(self, call: m.Call, expected: type[R], *, timeout: float | None = None) -> Fanout[R]:
        """Send a management call to every inference process and gather their answers."""
        wait = settings.INFERENCE_TIMEOUT_S if timeout is None else timeout
        try:
            on_record = {record.process_id for record in await registry.processes_live()}
        except (OSError, RedisError) as exc:
            raise InferenceUnavailable(f"The message broker (REDIS_URL) is unreachable: {exc.__class__.__name__}") from None
        if not on_record:  # none has announced itself yet: the first to start takes the call
            start_wait = settings.INFERENCE_START_TIMEOUT_S if settings.INFERENCE_EXPECTED else settings.INFERENCE_TIMEOUT_S
            try:
                return await self._first_taker(call, expected, wait=wait, start_wait=min(wait, start_wait))
            except (OSError, RedisError) as exc:
                raise InferenceUnavailable(
                    f"The message broker (REDIS_URL) is unreachable: {exc.__class__.__name__}") from None
        layer = self.layer
        try:
            reply_channel = await layer.new_channel()
            await layer.group_send(m.control_group(self.channel),
                                   call.model_copy(update={"reply_channel": reply_channel, "broadcast": True}).model_dump())
            received, answers = await self._gather(layer, reply_channel, on_record, wait)
        except (OSError, RedisError) as exc:
            raise InferenceUnavailable(f"The message broker (REDIS_URL) is unreachable: {exc.__class__.__name__}") from None
        return _fanout(call, expected, answers, no_answer=sorted((on_record | received) - answers.keys()), wait=wait)

    async def _first_taker(self, call: m.Call, expected: type[R], *, wait: float, start_wait: float) -> Fanout[R]:
        """The call on the shared channel, for whichever process takes it: wait `start_wait` for one to
        acknowledge it (none may be alive), then the call's own `wait` for its answer (a load takes long)."""
        layer = self.layer
        reply_channel = await layer.new_channel()
        await layer.send(self.channel, call.model_copy(update={"reply_channel": reply_channel, "broadcast": True})
                         .model_dump())
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + start_wait
        while (remaining := deadline - loop.time()) > 0:
            try:
                message = m.parse_reply(await asyncio.wait_for(layer.receive(reply_channel), remaining))
            except (TimeoutError, ValidationError):
                continue
            if isinstance(message, m.Received):
                deadline = start + wait  # a live process has it: now the call's own timeout applies
            elif isinstance(message, m.Applied):
                try:
                    answer = m.parse_reply(message.reply)
                except ValidationError:
                    raise MillmError("The inference process sent a malformed reply; see the inference log") from None
                return _fanout(call, expected, {message.process_id: answer}, no_answer=[], wait=wait)
        raise InferenceUnavailable(f"No inference process answered within {deadline - start:g}s")

    async def _gather(self, layer, reply_channel: str, on_record: set[str],
                      wait: float) -> tuple[set[str], dict[str, m.AnyReply]]:
        """Answers from every process that acknowledged the call. A process on record that sends no
        receipt within RECEIPT_WINDOW_S is gone (its heartbeat has not expired yet): not waited for."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        received: set[str] = set()
        answers: dict[str, m.AnyReply] = {}
        while True:
            in_window = loop.time() - start < RECEIPT_WINDOW_S
            if not (received | (on_record if in_window else set())) - answers.keys():
                return received, answers
            deadline = start + wait
            if in_window and not on_record <= received:
                deadline = min(deadline, start + RECEIPT_WINDOW_S)
            remaining = deadline - loop.time()
            if remaining <= 0:
                if loop.time() - start >= wait:
                    return received, answers
                continue  # the receipt window closed: from now on only the acknowledged ones count
            try:
                raw = await asyncio.wait_for(layer.receive(reply_channel), remaining)
            except TimeoutError:
                continue
            try:
                message = m.parse_reply(raw)
            except ValidationError:
                continue
            if isinstance(message, m.Received | m.Applied):
                received.add(message.process_id)
            if isinstance(message, m.Applied):
                try:
                    answers[message.process_id] = m.parse_reply(message.reply)
                except ValidationError:
                    answers[message.process_id] = m.Error(code="INTERNAL_ERROR", status=500,
                                                          message="malformed reply from an inference process")

    async def channel_for_model(self, model: str | None) -> str:
        """Where a generation or embedding for `model` goes: the own channel of the least busy live process
        serving it (ties broken at random, so a burst spreads while heartbeats are a second old); the
        shared channel when none does (any process then refuses it, or the first to start serves it).

        One consumer per channel on purpose: channels-redis puts each received message in an in-flight
        backup queue that the next receiver on the same channel moves back before it pops, so two
        processes receiving from one channel can both get the same message (a generation run twice).
        """
        if not model:
            return self.channel
        serving = [r for r in await self._records() if r.loaded_model == model and _alive(r)]
        if not serving:
            return self.channel
        least = min(r.queue_depth + r.active_requests for r in serving)
        return random.choice([r for r in serving if r.queue_depth + r.active_requests == least]).channel

    async def _routes(self) -> set[str]:
        """The models some live process serves."""
        return {r.loaded_model for r in await self._records() if r.loaded_model and _alive(r)}

    async def _records(self) -> list[registry.ProcessRecord]:
        now = time.monotonic()
        if self._records_cache is not None and now - self._records_cache[0] < ROUTES_TTL_S:
            return self._records_cache[1]
        try:
            records = await registry.processes_live()
        except (OSError, RedisError):
            records = []  # Redis away: the shared channel's send reports it
        self._records_cache = (now, records)
        return records

    async def send(self, call: m.Message, *, channel: str | None = None) -> None:
        """A call that gets no reply (cancel)."""
        await self.layer.send(channel or self.channel, call.model_dump())

    # --- one method per call -------------------------------------------------------------------

    async def ping(self, *, timeout: float | None = None, channel: str | None = None) -> m.Pong:
        return await self.call(m.Ping(), m.Pong, timeout=timeout, channel=channel)

    async def load_model(self, name: str, *, dtype: str | None = None,
                         quantization: str | None = None) -> Fanout[m.Loaded]:
        return await self.broadcast(m.LoadModel(model=name, dtype=dtype, quantization=quantization), m.Loaded,
                                    timeout=LOAD_TIMEOUT_S)

    async def unload_model(self, name: str | None = None) -> Fanout[m.Unloaded]:
        return await self.broadcast(m.UnloadModel(model=name), m.Unloaded, timeout=SHORT_TIMEOUT_S)

    async def attach_sae(self, name: str) -> Fanout[m.Attached]:
        return await self.broadcast(m.AttachSae(sae=name), m.Attached, timeout=ATTACH_TIMEOUT_S)

    async def detach_sae(self, name: str | None = None) -> Fanout[m.Detached]:
        return await self.broadcast(m.DetachSae(sae=name), m.Detached, timeout=SHORT_TIMEOUT_S)

    async def set_steering(self, steering: m.Steering, *, sae: str | None = None) -> Fanout[m.SteeringSet]:
        return await self.broadcast(m.SetSteering(steering=steering, sae=sae), m.SteeringSet, timeout=SHORT_TIMEOUT_S)

    async def configure_monitoring(self, *, enabled: bool | None = None, top_k: int | None = None,
                                   features: list[int] | None = None) -> Fanout[m.MonitoringSettings]:
        return await self.broadcast(m.ConfigureMonitoring(enabled=enabled, top_k=top_k, features=features),
                                    m.MonitoringSettings)

    async def statistics(self, *, top: int = 20, by: str = "mean", sae: str | None = None) -> m.Statistics:
        return await self.call(m.GetStatistics(top=top, by=by, sae=sae), m.Statistics)

    async def reset_statistics(self) -> Fanout[m.StatisticsReset]:
        return await self.broadcast(m.ResetStatistics(), m.StatisticsReset)

    async def embed(self, *, model: str | None, texts: list[str]) -> m.Embeddings:
        return await self.call(m.Embed(model=model, texts=texts), m.Embeddings, timeout=EMBED_TIMEOUT_S,
                               channel=await self.channel_for_model(model))

    async def feature_logit_lens(self, *, model: str, sae: str, index: int, count: int = 10) -> m.FeatureLogits:
        """Sent to a process serving `model` (the one with the SAE attached), not the shared channel."""
        return await self.call(m.FeatureLogitLens(sae=sae, index=index, count=count), m.FeatureLogits,
                               channel=await self.channel_for_model(model))

    async def token_diff(self, *, model: str, call: m.TokenDiff) -> m.TokenDiffResult:
        """Teacher-forced scoring runs between decode passes: bounded like embeddings, not like a ping."""
        return await self.call(call, m.TokenDiffResult, timeout=SCORE_TIMEOUT_S,
                               channel=await self.channel_for_model(model))

    async def score_texts(self, *, model: str, call: m.ScoreTexts) -> m.TextScores:
        return await self.call(call, m.TextScores, timeout=SCORE_TIMEOUT_S, channel=await self.channel_for_model(model))

    async def cancel(self, *, request_id: str, channel: str) -> None:
        await self.send(m.Cancel(request_id=request_id), channel=channel)


def _alive(record: registry.ProcessRecord) -> bool:
    """False for a process on this host whose pid is gone (its record has not expired yet)."""
    if record.host != registry.host_name():
        return True
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fanout(call: m.Call, expected: type[R], answers: dict[str, m.AnyReply], *, no_answer: list[str],
            wait: float) -> Fanout[R]:
    """Which processes applied the call; when none did, the refusal they gave (or why nobody answered)."""
    applied = {pid: reply for pid, reply in answers.items() if isinstance(reply, expected)}
    skipped = sorted(pid for pid, reply in answers.items() if isinstance(reply, m.Skipped))
    errors = {pid: reply for pid, reply in answers.items() if isinstance(reply, m.Error)}
    failed = [{"process_id": pid, "code": e.code, "message": e.message} for pid, e in sorted(errors.items())]
    if applied:
        first = sorted(applied)[0]
        return Fanout(reply=applied[first], applied=sorted(applied), skipped=skipped, failed=failed, no_answer=no_answer)
    if errors:
        error = errors[sorted(errors)[0]]
        raise error_for_code(error.code, error.message, status=error.status, param=error.param, details=error.details)
    if skipped:
        raise Conflict(f"No inference process can apply {call.type}: each is pinned to another model",
                       details={"skipped": skipped})
    raise InferenceUnavailable(f"No inference process answered within {wait:g}s")


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
