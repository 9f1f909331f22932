"""Step-level continuous batching: one thread owns the model and runs the decode batch.

Each loop iteration (1) runs queued management calls, (2) drops cancelled rows, (3) prefills newly
submitted requests as one left-padded group, samples their first token and merges their KV cache
into the running batch (see batch_cache), (4) runs one decode step for every row, each with its own
SamplingParams and steering, and (5) lets finished rows leave. Interceptors (the SAE hook) get a
ForwardContext before every forward pass and are collected after it.

Fair admission: a prompt longer than one chunk is prefilled one chunk per iteration (one such prompt
at a time), so no iteration holds the decode step for more than about one chunk's forward pass, and
short requests queued behind it are admitted past it in the meantime. A chunk is sized to take about
`prefill_chunk_s`: the first is `first_chunk_tokens`, then each chunk's time sets the next one's size
(within [32, `prefill_chunk_tokens`]), since a CPU is 100x slower per token than a GPU and attention
grows with the prompt. A row that
captures features gets its chunks' captures joined as if its prompt had run in one pass.

Threading: submit(), cancel() and status() may be called from any thread; everything that touches
the model, including `call(fn)` for management work such as attaching a hook, runs on the loop
thread between steps, so no forward pass ever races another.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from engine.batch_cache import check_cache_support
from engine.decode_batch import DecodeBatch, PartialPrefill
from engine.embeddings import EmbeddingJob, EmbeddingResult
from engine.errors import SchedulerUnavailableError
from engine.generation import GenerationRequest, RequestHandle
from engine.interceptors import ForwardInterceptor
from engine.loading import LoadedModel
from engine.rows import Row
from engine.sampling import InvalidRequestError

log = logging.getLogger("millm.engine.scheduler")
T = TypeVar("T")
THROUGHPUT_WINDOW_S = 10.0
MIN_CHUNK_TOKENS = 32  # below this a chunk's fixed costs dominate


@dataclass(frozen=True)
class SchedulerStatus:
    running: bool
    queued: int
    active: int
    max_batch_size: int
    tokens_per_second: float  # generated tokens over the last THROUGHPUT_WINDOW_S seconds
    requests_total: int  # requests that reached the model
    tokens_total: int


class GenerationScheduler:
    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_batch_size: int = 16,
        max_prefill_tokens: int = 4096,
        max_queued: int = 1024,
        interceptors: Sequence[ForwardInterceptor] = (),
        max_tokens_default: int | None = None,
        embed_piece_tokens: int = 256,
        max_embed_tokens: int | None = None,
        prefill_chunk_tokens: int = 512,
        prefill_chunk_s: float = 0.5,
        first_chunk_tokens: int = 128,
    ) -> None:
        check_cache_support(loaded.model.config)
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_queued = max_queued
        # max_tokens when a request leaves it out, and the most one may ask for (None: the context).
        self.max_tokens_default = max_tokens_default
        # Embeddings run in pieces of this many tokens between decode steps: a long input never
        # holds generation for more than one piece.
        self.embed_piece_tokens = embed_piece_tokens
        self.max_embed_tokens = max_embed_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens  # the largest chunk
        self.prefill_chunk_s = prefill_chunk_s
        self._chunk_tokens = first_chunk_tokens  # the next chunk's size; longer prompts are chunked
        self._partial: PartialPrefill | None = None  # the long prompt being prefilled chunk by chunk
        self._embeds: collections.deque[tuple[EmbeddingJob, Future]] = collections.deque()
        self._interceptors: tuple[ForwardInterceptor, ...] = tuple(interceptors)
        self._eos = loaded.eos_token_ids
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._lock = threading.Condition()
        self._intake: collections.deque[Row] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._cancel_seen = False
        self._stopping = False
        self._drain_deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._batch = DecodeBatch(self.model, pad_id, lambda: self._interceptors)
        self._throughput: collections.deque[tuple[float, int]] = collections.deque(maxlen=8192)
        self.requests_total = 0
        self.tokens_total = 0
        self._created = time.monotonic()

    # --- lifecycle ---

    def start(self) -> GenerationScheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="millm-generation", daemon=True)
            self._thread.start()
        return self

    def stop(self, *, drain_timeout_s: float = 0.0) -> None:
        """Stop taking requests; let running rows finish for up to drain_timeout_s, cancel the rest."""
        with self._lock:
            self._stopping = True
            self._drain_deadline = time.monotonic() + drain_timeout_s
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:  # never started: nothing else will answer what is queued
            self._stop_now()
            for _, future in self._calls:
                future.cancel()

    @property
    def preallocated_cache(self) -> bool:
        """KV caches in preallocated buffers (the default) or HF's DynamicCache; applies to new prefills."""
        return self._batch.preallocated_cache

    @preallocated_cache.setter
    def preallocated_cache(self, value: bool) -> None:
        self._batch.preallocated_cache = value

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # --- any thread ---

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Validate and queue a request; raises InvalidRequestError (HTTP 400) or
        SchedulerUnavailableError (HTTP 503)."""
        prompt_ids = self._prompt_ids(request)
        params = request.params
        params.check_vocab(self.loaded.vocab_size)
        context = self.loaded.context_length
        ceiling = self.max_tokens_default
        if params.max_tokens is None:
            max_tokens = context - len(prompt_ids)
            if ceiling is not None:
                max_tokens = min(max_tokens, ceiling)
            if max_tokens < 1:
                raise InvalidRequestError(
                    param=request.prompt_param,
                    message=f"this model's maximum context length is {context} tokens; the prompt has "
                    f"{len(prompt_ids)} tokens, which leaves no room to generate",
                    code="context_length_exceeded",
                )
        else:
            max_tokens = params.max_tokens
            if ceiling is not None and max_tokens > ceiling:
                raise InvalidRequestError(
                    param="max_tokens",
                    message=f"max_tokens is {max_tokens}; this server allows at most {ceiling} "
                    "(MILLM_MAX_TOKENS_DEFAULT)",
                )
            if len(prompt_ids) + max_tokens > context:
                raise InvalidRequestError(
                    param="max_tokens",
                    message=f"this model's maximum context length is {context} tokens; the prompt has "
                    f"{len(prompt_ids)} tokens and max_tokens asks for {max_tokens} more "
                    f"({len(prompt_ids) + max_tokens} in total)",
                    code="context_length_exceeded",
                )
        handle = RequestHandle(request.request_id, len(prompt_ids), self._note_cancel)
        row = Row(request, handle, prompt_ids, max_tokens, self.tokenizer, self._eos)
        with self._lock:
            if self._stopping:  # before start() requests wait in the queue
                raise SchedulerUnavailableError("the generation scheduler is not running")
            if len(self._intake) >= self.max_queued:
                raise SchedulerUnavailableError(f"too many queued requests ({self.max_queued}); retry later")
            self._intake.append(row)
            self._lock.notify()
        return handle

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run fn on the loop thread between forward passes (model surgery, embeddings, ...)."""
        future: Future[T] = Future()
        with self._lock:
            if self._stopping:
                raise SchedulerUnavailableError("the generation scheduler is not running")
            self._calls.append((fn, future))
            self._lock.notify()
        return future

    def embed(self, texts: Sequence[str | Sequence[int]], *, timeout_s: float | None = None,
              normalize: bool = True) -> EmbeddingResult:
        """Embeddings computed in pieces between decode steps (blocking; call it from a worker thread:
        tokenizing happens here). After timeout_s the work is dropped and SchedulerUnavailableError raised."""
        job = EmbeddingJob(self.loaded, texts, normalize=normalize, max_total_tokens=self.max_embed_tokens)
        future: Future[EmbeddingResult] = Future()
        with self._lock:
            if self._stopping:
                raise SchedulerUnavailableError("the generation scheduler is not running")
            self._embeds.append((job, future))
            self._lock.notify()
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeoutError:
            job.cancelled = True  # the loop drops it before its next piece
            raise SchedulerUnavailableError(f"the embeddings did not finish within {timeout_s:g}s") from None

    @property
    def interceptors(self) -> tuple[ForwardInterceptor, ...]:
        """What rides on every forward pass: a pass run through `call` (token-diff scoring) sets the same ones."""
        return self._interceptors

    def status(self) -> SchedulerStatus:
        now = time.monotonic()
        recent = sum(n for t, n in list(self._throughput) if now - t <= THROUGHPUT_WINDOW_S)
        # Over the whole window (or the time since start): a single fast step is not a rate.
        rate = recent / max(min(THROUGHPUT_WINDOW_S, now - self._created), 1e-3)
        return SchedulerStatus(
            running=self.running,
            queued=len(self._intake),
            active=len(self._batch) + (self._partial is not None),
            max_batch_size=self.max_batch_size,
            tokens_per_second=round(rate, 2),
            requests_total=self.requests_total,
            tokens_total=self.tokens_total,
        )

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        if isinstance(request.prompt, str):
            ids = list(self.tokenizer(request.prompt)["input_ids"])
        else:
            ids = list(request.prompt)
            vocab = self.loaded.vocab_size
            if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab for i in ids):
                raise InvalidRequestError(
                    param=request.prompt_param, message=f"prompt token ids must be integers in [0, {vocab})"
                )
        if not ids:
            raise InvalidRequestError(param=request.prompt_param, message="the prompt must not be empty")
        return ids

    def _note_cancel(self) -> None:
        with self._lock:
            self._cancel_seen = True
            self._lock.notify()

    # --- loop thread ---

    def _run(self) -> None:
        # no_grad rather than inference_mode: tensors that management calls create here (SAE
        # weights, statistics) stay ordinary tensors that other threads may update in place.
        with torch.no_grad():
            while True:
                with self._lock:
                    while not (
                        self._intake or self._batch or self._calls or self._stopping or self._cancel_seen
                        or self._embeds or self._partial
                    ):
                        self._lock.wait()
                    calls = list(self._calls)
                    self._calls.clear()
                    reap, self._cancel_seen = self._cancel_seen, False
                    stopping = self._stopping
                for fn, future in calls:
                    self._run_call(fn, future)
                if stopping and self._stop_now():
                    break
                try:
                    if reap:
                        self._reap_cancelled()
                    if not stopping:
                        self._embed_piece()
                        self._admit()
                    if self._batch:
                        self._count(self._batch.step())
                except Exception:  # a bug here must not leave every client waiting forever
                    log.exception("scheduler iteration failed")
                    self._batch.finish_all("error", "generation failed on the server")
                    self._drop_partial("error", "generation failed on the server")

    def _drop_partial(self, reason: str, error: str | None = None) -> None:
        if self._partial is not None:
            self._partial.row.finish(reason, error)  # type: ignore[arg-type]
            self._partial = None

    def _stop_now(self) -> bool:
        if (self._batch or self._partial) and self._drain_deadline is not None and time.monotonic() < self._drain_deadline:
            return False
        with self._lock:
            queued = list(self._intake)
            self._intake.clear()
        for row in queued:
            row.finish("cancelled")
        self._drop_partial("cancelled")
        self._batch.finish_all("cancelled")
        with self._lock:
            embeds = list(self._embeds)
            self._embeds.clear()
        for _, future in embeds:
            if future.set_running_or_notify_cancel():
                future.set_exception(SchedulerUnavailableError("the generation scheduler stopped"))
        return True

    def _embed_piece(self) -> None:
        """One bounded piece of the oldest embeddings request (then the decode step runs)."""
        with self._lock:
            if not self._embeds:
                return
            job, future = self._embeds[0]
        if job.cancelled or future.cancelled():
            with self._lock:
                self._embeds.popleft()
            return
        self._batch.set_context(None)  # the interceptors neither steer nor capture an embedding
        try:
            job.run_piece(batch_tokens=self.embed_piece_tokens)
        except Exception as exc:  # handed to the caller, never kills the loop
            with self._lock:
                self._embeds.popleft()
            if future.set_running_or_notify_cancel():
                future.set_exception(exc)
            return
        if job.done:
            with self._lock:
                self._embeds.popleft()
            if future.set_running_or_notify_cancel():
                future.set_result(job.result())

    def _run_call(self, fn: Callable[[], Any], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        self._batch.set_context(None)
        try:
            future.set_result(fn())
        except Exception as exc:  # handed to the caller, never kills the loop
            future.set_exception(exc)

    def _reap_cancelled(self) -> None:
        with self._lock:
            kept = [row for row in self._intake if not row.handle.cancelled]
            dropped = [row for row in self._intake if row.handle.cancelled]
            self._intake = collections.deque(kept)
        for row in dropped:
            row.finish("cancelled")
        if self._partial is not None and self._partial.row.handle.cancelled:
            self._drop_partial("cancelled")
        self._batch.remove([i for i, row in enumerate(self._batch.rows) if row.handle.cancelled], "cancelled")

    def _admit(self) -> None:
        """At most one chunk of the long prompt in progress, then a group of short prompts (queued in
        order, passing long ones that wait for their turn), bounded by max_prefill_tokens."""
        if self._partial is not None:
            size, done = min(self._chunk_tokens, self.prefill_chunk_tokens), self._partial.done
            started = time.perf_counter()
            self._count(self._batch.prefill_chunk(self._partial, size))
            per_token_s = (time.perf_counter() - started) / max(self._partial.done - done, 1)
            self._chunk_tokens = max(MIN_CHUNK_TOKENS, int(self.prefill_chunk_s / max(per_token_s, 1e-9)))
            if self._partial.finished:
                self._partial = None
        group: list[Row] = []
        start_partial: Row | None = None
        with self._lock:
            waiting: list[Row] = []
            while self._intake and (len(self._batch) + (self._partial is not None) + (start_partial is not None)
                                    + len(group) < self.max_batch_size):
                row = self._intake.popleft()
                if self._chunked(row):
                    if self._partial is None and start_partial is None:
                        start_partial = row
                    else:
                        waiting.append(row)
                    continue
                width = max(len(r.prompt_ids) for r in [*group, row])
                if group and width * (len(group) + 1) > self.max_prefill_tokens:
                    self._intake.appendleft(row)
                    break
                group.append(row)
            self._intake.extendleft(reversed(waiting))
        if group:
            self.requests_total += len(group)
            self._count(self._batch.prefill(group))
        if start_partial is not None:  # its first chunk runs next iteration, after a decode step
            self.requests_total += 1
            self._partial = self._batch.start_partial(start_partial)

    def _chunked(self, row: Row) -> bool:
        return len(row.prompt_ids) > min(self._chunk_tokens, self.prefill_chunk_tokens)

    def _count(self, tokens: int) -> None:
        if tokens:
            self.tokens_total += tokens
            self._throughput.append((time.monotonic(), tokens))
