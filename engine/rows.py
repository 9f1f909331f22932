"""One request while the scheduler runs it: its text state, stop rules and event delivery."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from engine.generation import (
    FinishEvent,
    FinishReason,
    GenerationRequest,
    RequestHandle,
    Timings,
    TokenEvent,
    Usage,
)
from engine.interceptors import RowInfo
from engine.sampling import effective_seed
from engine.steering_conditions import SteeringAbort
from engine.text_stream import IncrementalDetokenizer, StopMatcher


class Row:
    def __init__(
        self,
        request: GenerationRequest,
        handle: RequestHandle,
        prompt_ids: list[int],
        max_tokens: int,
        tokenizer: Any,
        eos_token_ids: frozenset[int],
    ) -> None:
        self.request_id = request.request_id
        self.handle = handle
        self.prompt_ids = prompt_ids
        self.params = request.params
        self.seed = effective_seed(request.params)
        self.info = RowInfo(request_id=request.request_id, steering=request.steering, monitor=request.monitor,
                            features=request.features, conditions=request.conditions)
        # SteeringSpec.max_steered_tokens / until_concept: the row drops its steering after that many tokens, or
        # once it writes a stop token (read off the compiled steering, opaque otherwise).
        self._steer_limit: int | None = getattr(request.steering, "max_steered_tokens", None)
        self._stop_tokens: frozenset[int] = getattr(request.steering, "stop_token_ids", frozenset())
        self.max_tokens = max_tokens
        self.generated = 0
        self.done = False
        self._eos = frozenset() if request.params.ignore_eos else eos_token_ids
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = StopMatcher(request.params.stop)
        self._submitted = time.monotonic()
        self._started: float | None = None
        self._first_token: float | None = None
        self._last_token: int | None = None

    def started(self) -> None:
        self._started = time.monotonic()

    def accept(
        self,
        token_id: int,
        logprob: float | None,
        top: tuple[tuple[int, float], ...] | None,
        captures: tuple[Any, ...],
    ) -> bool:
        """Take one generated token, emit its event; True when the request is finished."""
        abort = _abort_in(captures)
        if abort is not None:
            # The abort held at this pass's input token (the last one emitted): the token sampled from it is dropped.
            self.finish("content_filter", abort={"index": abort.index, "value": abort.value,
                                                 "position": len(self.prompt_ids) + self.generated - 1,
                                                 "token_id": self._last_token,
                                                 **({"sae": abort.sae} if abort.sae else {})})
            return True
        self._last_token = token_id
        self.generated += 1
        if self._first_token is None:
            self._first_token = time.monotonic()
        reason: FinishReason | None = None
        if token_id in self._eos:
            text, reason = self._tail(), "stop"
        else:
            text, hit_stop = self._stops.push(self._detokenizer.push(token_id))
            if hit_stop:
                reason = "stop"
            elif self.generated >= self.max_tokens:
                text, reason = text + self._tail(), "length"
        self.handle._push(TokenEvent(text, token_id, logprob, top, captures))
        if reason is None and self.info.steering is not None and (
                (self._steer_limit is not None and self.generated >= self._steer_limit) or token_id in self._stop_tokens):
            # Every later pass runs unsteered; the batch sees a new RowInfo and rebuilds its per-row tensors.
            self.info = replace(self.info, steering=None)
        if reason is not None:
            self.finish(reason)
        else:
            self.handle._wake()
        return reason is not None

    def _tail(self) -> str:
        """Text held back so far, released because the request ends for another reason."""
        text, hit_stop = self._stops.push(self._detokenizer.flush())
        return text if hit_stop else text + self._stops.flush()

    def finish(self, reason: FinishReason, error: str | None = None, *, abort: dict[str, Any] | None = None) -> None:
        if self.done:
            return
        self.done = True
        now = time.monotonic()
        timings = Timings(
            queued_s=round((self._started or now) - self._submitted, 6),
            first_token_s=round(self._first_token - self._submitted, 6) if self._first_token else None,
            total_s=round(now - self._submitted, 6),
        )
        usage = Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=self.generated)
        self.handle._push(FinishEvent(reason, usage, timings, error, abort))
        self.handle._wake()


def _abort_in(captures: tuple[Any, ...]) -> Any:
    """The SteeringAbort among a pass's captures (an interceptor's entry may be a tuple of entries)."""
    for entry in captures:
        for item in entry if isinstance(entry, tuple) else (entry,):
            if isinstance(item, SteeringAbort):
                return item
    return None
