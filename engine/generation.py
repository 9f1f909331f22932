"""What a caller hands the scheduler (GenerationRequest) and what it gets back: a RequestHandle
delivering TokenEvents and one final FinishEvent, to a thread (`for event in handle`) or to asyncio
(`async for events in handle.batches()`).

Every generated token yields exactly one TokenEvent (EOS included, with empty text), so
`usage.completion_tokens` equals the number of TokenEvents.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.sampling import SamplingParams

# content_filter: an abort condition held (engine/steering_conditions.py); FinishEvent.abort says which
FinishReason = Literal["stop", "length", "cancelled", "error", "content_filter"]


@dataclass(frozen=True)
class GenerationRequest:
    # Text is tokenized with the tokenizer's special tokens (BOS); token ids (a chat prompt) go in as is.
    prompt: str | Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    steering: Any | None = None  # opaque: handed to the interceptors in RowInfo
    monitor: bool = False  # interceptors capture per-token features for this request
    features: Any | None = None  # the request's own per-token features (engine.request_features.FeatureRequest)
    conditions: Any | None = None  # conditional steering and abort (engine.steering_conditions.CompiledConditions)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    prompt_param: str = "prompt"  # the API field errors about the prompt name ("messages" for chat)


@dataclass(frozen=True)
class TokenEvent:
    text_delta: str  # may be "": an incomplete character, text that may start a stop string, EOS
    token_id: int
    logprob: float | None  # under the model's distribution (raw logits), when requested
    top_logprobs: tuple[tuple[int, float], ...] | None  # (token id, logprob), most likely first
    # What the interceptors captured in the forward pass that produced this token, one entry per
    # interceptor that captured anything: the prompt positions for the first token, then the
    # previous token's position. Empty when nothing is monitored.
    captures: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    queued_s: float  # submit to prefill
    first_token_s: float | None  # submit to first token
    total_s: float  # submit to finish


@dataclass(frozen=True)
class FinishEvent:
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    error: str | None = None  # set when finish_reason == "error": a message safe to show a client
    # set when finish_reason == "content_filter": {"index", "value", "position", "token_id"} of the abort
    abort: dict[str, Any] | None = None


Event = TokenEvent | FinishEvent


class RequestHandle:
    """The consumer's side of one request. Events arrive from the scheduler thread."""

    def __init__(self, request_id: str, prompt_tokens: int, on_cancel: Callable[[], None]) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._on_cancel = on_cancel
        self._cancelled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None
        self._wake_pending = False
        # What wakes the consumer's loop: "any" event while it waits for one, only the finish while it
        # pauses between batches, nothing while it handles a batch (it drains the queue next anyway).
        self._wants: Literal["none", "any", "finish"] = "none"
        self._finishing = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Stop generating: the row leaves at the next step and a FinishEvent("cancelled") follows."""
        if not self._cancelled:
            self._cancelled = True
            self._on_cancel()

    def get(self, timeout: float | None = None) -> Event:
        """The next event (blocking); queue.Empty after `timeout` seconds."""
        return self._events.get(timeout=timeout)

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self._events.get()
            yield event
            if isinstance(event, FinishEvent):
                return

    async def batches(self, pause: Callable[[], float] | None = None) -> AsyncIterator[list[Event]]:
        """Everything that arrived since the last wake-up, as one list: a server that sends one
        message per list coalesces tokens for free when it falls behind. `pause()`: the least seconds
        from one batch to the next (tokens wait, coalescing), cut short when the request finishes."""
        self._ready = asyncio.Event()
        self._loop = loop = asyncio.get_running_loop()  # from here on the scheduler wakes this loop
        while True:
            self._ready.clear()
            self._wants = "any"  # before draining: an event pushed after the drain wakes the loop
            events = self._drain()
            if not events:
                await self._ready.wait()
                continue
            self._wants = "none"
            yielded_at = loop.time()
            yield events
            if isinstance(events[-1], FinishEvent):
                return
            seconds = (pause() if pause is not None else 0.0) - (loop.time() - yielded_at)
            if seconds > 0:
                self._ready.clear()
                self._wants = "finish"  # before looking: a finish pushed after the look wakes the loop
                if not self._finishing:
                    timer = loop.call_later(seconds, self._ready.set)
                    try:
                        await self._ready.wait()
                    finally:
                        timer.cancel()

    def _drain(self) -> list[Event]:
        events: list[Event] = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    # --- scheduler side ---

    def _push(self, event: Event) -> None:
        if isinstance(event, FinishEvent):
            self._finishing = True
        self._events.put(event)

    def _wake(self) -> None:
        """Called once per step after this row's events: one loop wake-up per step at most, none while
        the consumer does not wait for what arrived."""
        loop = self._loop
        if loop is None or self._wake_pending:
            return
        if self._wants == "none" or (self._wants == "finish" and not self._finishing):
            return
        self._wake_pending = True
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            loop.call_soon_threadsafe(self._woken)

    def _woken(self) -> None:
        self._wake_pending = False
        if self._ready is not None:
            self._ready.set()
