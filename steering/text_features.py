"""The features most active on a text ("top features for this text"), from the per-token frames of an inspect.

Ranked by each feature's peak on the text relative to its own max activation (from its label): raw values
favour a few features that fire hard on every sentence (" be"/" as", the full stop), while the share of a
feature's own maximum puts the concept features ("Paris", "ocean") near the top.

Left out of the peaks: the first position (the attention sink: its features fire 100× harder whatever the
token), special tokens and whitespace-only tokens. The text is inspected after a leading newline so that
its first word is not the sink.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from monitoring.heatmap import is_special

SINK_PREFIX = "\n"
MAX_TEXT = 4000


@dataclass(frozen=True)
class TextFeature:
    index: int
    label: str
    peak: float  # the feature's highest value on the text
    token: str  # the token where it peaked
    relative: float | None  # peak / the feature's max activation, when its label records one
    tokens_active: int  # tokens of the text (counted ones) where it was among the captured top features


def text_top_features(frames: list[dict[str, Any]], *, labels: dict[int, tuple[str, float | None]],
                      limit: int = 20) -> list[TextFeature]:
    """`labels`: index → (label, max activation or None). Best first: relative peak, then raw peak."""
    peaks: dict[int, tuple[float, str]] = {}
    counts: dict[int, int] = {}
    for frame in frames:
        token = str(frame.get("token", ""))
        if int(frame.get("position", 0)) == 0 or is_special(token) or not token.strip():
            continue
        for key, value in (frame.get("features") or {}).items():
            index, value = int(key), float(value)
            if value <= 0:
                continue
            counts[index] = counts.get(index, 0) + 1
            if value > peaks.get(index, (0.0, ""))[0]:
                peaks[index] = (value, token)
    found = []
    for index, (peak, token) in peaks.items():
        label, max_activation = labels.get(index, ("", None))
        relative = peak / max_activation if max_activation else None
        found.append(TextFeature(index=index, label=label, peak=peak, token=token, relative=relative,
                                 tokens_active=counts[index]))
    found.sort(key=lambda f: (-(f.relative if f.relative is not None else 0.0), -f.peak, f.index))
    return found[:limit]
