"""Token ids in, text deltas out: incremental detokenization and text-level stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Prompt tokens decoded in front of the first generated ones, so a tokenizer that drops a leading
# space at the start of a decode (sentencepiece) still gives " world" after "Hello".
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Emits the text each new token adds, correct for multi-byte characters split over tokens.

    Decodes a short window (from the last emitted boundary) twice per token instead of the whole
    output: the new text is what the window decodes to beyond what its already-emitted part did. A
    window that ends in U+FFFD is an incomplete UTF-8 sequence: nothing is emitted until it completes.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end comes out as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        before = self._decode(self._ids[self._prefix_offset : self._read_offset])
        after = self._decode(self._ids[self._prefix_offset :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if self._prefix_offset > 256:  # keep the id list short on long outputs
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return after[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class StopMatcher:
    """Cuts the text at the first stop string, which may span tokens, and never emits any of it.

    Holds back the longest tail that could still grow into a stop string; everything before it is
    final and is emitted.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._held = ""

    def push(self, delta: str) -> tuple[str, bool]:
        """(text that is safe to emit, whether a stop string was reached)."""
        if not self._stops:
            return delta, False
        text = self._held + delta
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return text[:cut], True
        hold = self._longest_stop_prefix_suffix(text)
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        for length in range(min(len(text), self._max_hold), 0, -1):
            tail = text[-length:]
            if any(s.startswith(tail) for s in self._stops):
                return length
        return 0
