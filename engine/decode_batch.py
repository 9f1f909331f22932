"""The running decode batch: the model passes of the scheduler loop, with no threading in sight.

`prefill(group)` runs newly admitted requests as one left-padded pass, samples their first token
and merges their KV cache into the batch; `prefill_chunk(partial)` runs the next chunk of one long
prompt in its own cache (the scheduler runs one chunk per iteration, between decode steps) and joins
it the same way after the last chunk; `step()` runs one decode pass for every row. Per-row
tensors (last token, step count, sampling parameters, the interceptors' ForwardContext) are
rebuilt only when rows join or leave, so a steady decode step is: one forward pass, one batched
sample, one host transfer of the chosen ids, and each row's text bookkeeping.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from engine.batch_cache import BatchKVCache, new_cache
from engine.generation import FinishReason
from engine.interceptors import ForwardContext, ForwardInterceptor
from engine.rows import Row
from engine.sae_hook import FeatureCapture
from engine.sampling import SampledTokens, SamplingBatch, sample_next

log = logging.getLogger("millm.engine.scheduler")
FAILED = "generation failed on the server"


@dataclass
class PartialPrefill:
    """A long prompt prefilled a chunk at a time; its KV cache joins the batch after the last chunk."""

    row: Row
    cache: DynamicCache
    done: int = 0  # prompt tokens already in the cache
    captures: list[Any] | None = None  # the interceptors' captures of the chunks so far, as one pass's

    @property
    def finished(self) -> bool:
        return self.row.done or self.done >= len(self.row.prompt_ids)


class DecodeBatch:
    def __init__(
        self, model: Any, pad_id: int, interceptors: Callable[[], tuple[ForwardInterceptor, ...]]
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.pad_id = pad_id
        self.interceptors = interceptors  # read once per pass: the scheduler may swap the tuple any time
        # Only the last position's logits are needed: a big saving on prefill with a large vocabulary.
        accepts = inspect.signature(model.forward).parameters
        self._logits_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        self.rows: list[Row] = []
        self._cache: BatchKVCache | None = None
        self._last_ids = self._steps = torch.empty(0, dtype=torch.long, device=self.device)
        self._sampling: SamplingBatch | None = None
        self._context: ForwardContext | None = None
        self.preallocated_cache = True  # False: HF's DynamicCache as is (caches made from now on)

    def __len__(self) -> int:
        return len(self.rows)

    def prefill(self, group: list[Row]) -> int:
        """Run the group's prompts, emit their first tokens, let the unfinished ones join; returns
        the number of tokens generated."""
        width = max(len(r.prompt_ids) for r in group)
        pads = [width - len(r.prompt_ids) for r in group]
        input_ids = torch.tensor(
            [[self.pad_id] * pad + r.prompt_ids for r, pad in zip(group, pads, strict=True)],
            device=self.device,
        )
        columns = torch.arange(width, device=self.device).unsqueeze(0)
        pads_t = torch.tensor(pads, device=self.device).unsqueeze(1)
        mask = (columns >= pads_t).long()
        context = ForwardContext(
            rows=tuple(r.info for r in group),
            generated_mask=torch.zeros_like(mask, dtype=torch.bool),
            valid_mask=mask.bool(),
        )
        for row in group:
            row.started()
        cache = new_cache(self.model.config, preallocated=self.preallocated_cache)
        try:
            logits, captures = self._forward(
                context,
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=(columns - pads_t).clamp(min=0),
                past_key_values=cache,
            )
            sampling = SamplingBatch.build([r.params for r in group], [r.seed for r in group], self.device)
            sampled = sample_next(
                logits, sampling, torch.zeros(len(group), dtype=torch.long, device=self.device)
            )
        except Exception:
            log.exception("prefill failed")
            for row in group:
                row.finish("error", FAILED)
            return 0
        self._join(group, cache, pads, width, sampled, captures)
        return len(group)

    def start_partial(self, row: Row) -> PartialPrefill:
        row.started()
        return PartialPrefill(row, new_cache(self.model.config, preallocated=self.preallocated_cache))

    def prefill_chunk(self, partial: PartialPrefill, chunk_tokens: int) -> int:
        """The next chunk_tokens of the prompt (no padding: one row); after the last one, the first token
        is sampled and the row joins the batch. Returns the number of tokens generated (0 or 1)."""
        row, start = partial.row, partial.done
        ids = row.prompt_ids[start:start + chunk_tokens]
        last = start + len(ids) >= len(row.prompt_ids)
        prompt = torch.ones((1, len(ids)), dtype=torch.bool, device=self.device)
        context = ForwardContext(rows=(row.info,), generated_mask=~prompt, valid_mask=prompt)
        try:
            # The model derives the causal mask over cache + chunk from the cache's length.
            logits, captures = self._forward(
                context,
                input_ids=torch.tensor([ids], device=self.device),
                position_ids=torch.arange(start, start + len(ids), device=self.device).unsqueeze(0),
                past_key_values=partial.cache,
            )
            partial.done += len(ids)
            if row.request_id in captures:
                partial.captures = _joined(partial.captures, captures[row.request_id], start)
            if not last:
                return 0
            sampling = SamplingBatch.build([row.params], [row.seed], self.device)
            sampled = sample_next(logits, sampling, torch.zeros(1, dtype=torch.long, device=self.device))
        except Exception:
            log.exception("prefill failed")
            row.finish("error", FAILED)
            return 0
        captured = {row.request_id: partial.captures} if partial.captures is not None else {}
        self._join([row], partial.cache, [0], len(row.prompt_ids), sampled, captured)
        return 1

    def _join(self, group: list[Row], cache: DynamicCache, pads: list[int], width: int, sampled: SampledTokens,
              captures: dict[str, list[Any]]) -> None:
        """Hand the group its first tokens; the unfinished rows join the batch with their cache."""
        finished = self._deliver(group, sampled, captures)
        keep = [i for i in range(len(group)) if i not in finished]
        if keep:
            joined = BatchKVCache(cache, pads, width, self.device)
            first_ids = sampled.token_ids
            if len(keep) < len(group):
                joined.select(keep)
                first_ids = first_ids[keep]
            rows = self.rows + [group[i] for i in keep]
            if self._cache is None:
                self._set_rows(rows, joined, first_ids, torch.ones_like(first_ids))
            else:
                self._cache.merge(joined)
                steps = torch.cat([self._steps, torch.ones_like(first_ids)])
                self._set_rows(rows, self._cache, torch.cat([self._last_ids, first_ids]), steps)

    def step(self) -> int:
        """One decode pass for every row; returns the number of tokens generated."""
        assert self._cache is not None and self._sampling is not None and self._context is not None
        mask, positions = self._cache.decode_inputs()
        try:
            logits, captures = self._forward(
                self._context,
                input_ids=self._last_ids.unsqueeze(1),
                attention_mask=mask,
                position_ids=positions,
                past_key_values=self._cache.cache,
            )
            self._cache.commit_step(mask)
            sampled = sample_next(logits, self._sampling, self._steps)
        except Exception:
            log.exception("decode step failed")
            self.finish_all("error", FAILED)
            return 0
        self._last_ids = sampled.token_ids
        self._steps += 1
        count = len(self.rows)
        infos = self._context.rows
        finished = self._deliver(self.rows, sampled, captures)
        if finished:
            self.remove(sorted(finished))
        elif any(r.info is not info for r, info in zip(self.rows, infos, strict=True)):
            # A row's steering ended (max_steered_tokens / until_concept): the next pass reads its new RowInfo.
            self._context = ForwardContext(rows=tuple(r.info for r in self.rows), generated_mask=self._context.generated_mask,
                                           valid_mask=self._context.valid_mask)
        return count

    def remove(self, indices: list[int], reason: FinishReason | None = None) -> None:
        """Rows leave the batch (finished with `reason` first, unless they finished already)."""
        if not indices:
            return
        if reason is not None:
            for i in indices:
                self.rows[i].finish(reason)
        drop = set(indices)
        keep = [i for i in range(len(self.rows)) if i not in drop]
        if not keep:
            self._set_rows([], None)
            return
        assert self._cache is not None
        self._cache.select(keep)
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._set_rows([self.rows[i] for i in keep], self._cache, self._last_ids[index], self._steps[index])

    def finish_all(self, reason: FinishReason, error: str | None = None) -> None:
        for row in self.rows:
            row.finish(reason, error)
        self._set_rows([], None)

    def set_context(self, context: ForwardContext | None) -> None:
        for interceptor in self.interceptors():
            interceptor.set_context(context)

    def _forward(self, context: ForwardContext, **inputs: Any) -> tuple[torch.Tensor, dict[str, list[Any]]]:
        interceptors = self.interceptors()
        for interceptor in interceptors:
            interceptor.set_context(context)
        out = self.model(**inputs, use_cache=True, **self._logits_kwargs)
        captures: dict[str, list[Any]] = {}
        for interceptor in interceptors:
            for request_id, captured in interceptor.collect().items():
                captures.setdefault(request_id, []).append(captured)
        return out.logits[:, -1, :], captures

    def _deliver(self, rows: list[Row], sampled: SampledTokens, captures: dict[str, list[Any]]) -> set[int]:
        """Hand each row its token (the step's one host sync); the indices of rows that finished."""
        token_ids = sampled.token_ids.tolist()
        logprobs = sampled.logprobs.tolist() if sampled.logprobs is not None else None
        top_ids = sampled.top_ids.tolist() if sampled.top_ids is not None else None
        top_values = sampled.top_logprobs.tolist() if sampled.top_logprobs is not None else None
        finished: set[int] = set()
        for i, row in enumerate(rows):
            logprob = top = None
            if logprobs is not None and row.params.logprobs:
                logprob = logprobs[i]
                if top_ids is not None and top_values is not None and row.params.top_logprobs:
                    k = row.params.top_logprobs
                    top = tuple(zip(top_ids[i][:k], top_values[i][:k], strict=True))
            captured = tuple(captures.get(row.request_id, ())) if captures else ()
            if row.accept(token_ids[i], logprob, top, captured):
                finished.add(i)
        return finished

    def _set_rows(
        self,
        rows: list[Row],
        cache: BatchKVCache | None,
        last_ids: torch.Tensor | None = None,
        steps: torch.Tensor | None = None,
    ) -> None:
        """The batch changed: rebuild what stays fixed while it does not."""
        self.rows, self._cache = rows, cache
        if not rows or last_ids is None or steps is None:
            self.rows, self._cache, self._sampling, self._context = [], None, None, None
            self._last_ids = self._steps = torch.empty(0, dtype=torch.long, device=self.device)
            return
        self._last_ids, self._steps = last_ids, steps
        self._sampling = SamplingBatch.build([r.params for r in rows], [r.seed for r in rows], self.device)
        ones = torch.ones((len(rows), 1), dtype=torch.bool, device=self.device)
        self._context = ForwardContext(rows=tuple(r.info for r in rows), generated_mask=ones, valid_mask=ones)


def _joined(earlier: list[Any] | None, chunk: list[Any], offset: int) -> list[Any]:
    """One row's captures of a prompt chunk appended to those of the chunks before it, as if the prompt
    had run in one pass (the frame builders read a prefill capture's tokens as prompt positions 0..n-1).
    Same interceptors, same order in every chunk: entries pair up one to one."""
    if earlier is None:
        return [_shifted(entry, offset) for entry in chunk]
    if len(earlier) != len(chunk):
        raise ValueError("the interceptors changed during a chunked prefill")
    return [_join_entry(a, b, offset) for a, b in zip(earlier, chunk, strict=True)]


def _shifted(entry: Any, offset: int) -> Any:
    if isinstance(entry, tuple):
        return tuple(_shifted(e, offset) for e in entry)
    if isinstance(entry, FeatureCapture):
        return FeatureCapture(input_positions=[p + offset for p in entry.input_positions],
                              generated=list(entry.generated), topk_indices=list(entry.topk_indices),
                              topk_values=list(entry.topk_values),
                              monitored={k: list(v) for k, v in entry.monitored.items()}, steered=entry.steered,
                              sae=entry.sae)
    return entry


def _join_entry(a: Any, b: Any, offset: int) -> Any:
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return tuple(_join_entry(x, y, offset) for x, y in zip(a, b, strict=True))
    if isinstance(a, FeatureCapture) and isinstance(b, FeatureCapture) and a.steered == b.steered \
            and a.sae == b.sae and a.monitored.keys() == b.monitored.keys():
        a.input_positions.extend(p + offset for p in b.input_positions)
        a.generated.extend(b.generated)
        a.topk_indices.extend(b.topk_indices)
        a.topk_values.extend(b.topk_values)
        for feature, values in b.monitored.items():
            a.monitored[feature].extend(values)
        return a
    raise ValueError("a chunk's captures do not match the earlier chunks'")
