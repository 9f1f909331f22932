"""Word-level difference between an unsteered and a steered answer, for the compare panel."""

from __future__ import annotations

import re
from difflib import SequenceMatcher

_PIECES = re.compile(r"\s+|\w+|[^\w\s]")


def word_diff(before: str, after: str) -> list[tuple[str, bool]]:
    """`after` cut into pieces, each flagged True where it is not in `before` (inserted or replaced)."""
    a, b = _PIECES.findall(before), _PIECES.findall(after)
    pieces: list[tuple[str, bool]] = []
    for tag, _, _, j1, j2 in SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if j2 > j1:
            pieces.append(("".join(b[j1:j2]), tag != "equal"))
    return pieces


def same_share(before: str, after: str) -> float:
    """Share of the pieces the two answers have in common (1.0: identical)."""
    a, b = _PIECES.findall(before), _PIECES.findall(after)
    return SequenceMatcher(a=a, b=b, autojunk=False).ratio() if a or b else 1.0
