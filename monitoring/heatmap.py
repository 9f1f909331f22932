"""The history detail's tokens × features heatmap.

Special tokens (`<|im_start|>`, `<s>`, BOS …) fire features 10–100× harder than text does, so they are
left out of the column choice and the colour scale unless asked for. Columns: the strongest features
on generated tokens first (half the columns), then on any text token; each labelled. A request recorded
while several SAEs were attached holds frames of each (every frame names its `sae`): the page shows one
SAE's frames at a time, with that SAE's labels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

SPECIAL = re.compile(r"^\s*(<\|[^|>]*\|>|<\/?s>|<(bos|eos|pad|unk|start_of_turn|end_of_turn)>)\s*$")
CHAT_USER_TURN = (  # the last user turn in the chat templates the demo and common models use
    re.compile(r"<\|im_start\|>user\s*\n(.*?)<\|im_end\|>", re.S),
    re.compile(r"<\|start_header_id\|>user<\|end_header_id\|>\s*(.*?)<\|eot_id\|>", re.S),
    re.compile(r"<start_of_turn>user\s*\n(.*?)<end_of_turn>", re.S),
    re.compile(r"\[INST\](.*?)\[/INST\]", re.S),
)


def is_special(token: str) -> bool:
    return bool(SPECIAL.match(token))


def user_prompt(prompt: str) -> str:
    """The last user turn of a chat-templated prompt (the system boilerplate left out); else the prompt."""
    for pattern in CHAT_USER_TURN:
        turns = pattern.findall(prompt or "")
        if turns:
            return turns[-1].strip()
    return prompt or ""


def frame_saes(token_features: list[dict[str, Any]]) -> list[str]:
    """The SAEs a request's frames name, in the order they first appear (attach order); empty when the frames
    name none (one SAE was attached: all of them are its)."""
    names: dict[str, None] = {}
    for frame in token_features or []:
        if isinstance(frame, dict) and frame.get("sae"):
            names.setdefault(str(frame["sae"]), None)
    return list(names)


def frames_of_sae(token_features: list[dict[str, Any]], sae: str) -> list[dict[str, Any]]:
    """One SAE's frames of a request whose frames come from several (features of two SAEs never share a table)."""
    return [f for f in token_features or [] if isinstance(f, dict) and f.get("sae") == sae]


@dataclass(frozen=True)
class Column:
    index: int
    label: str
    peak: float


@dataclass(frozen=True)
class HeatRow:
    position: int
    token: str
    kind: str
    special: bool
    cells: list[tuple[float | None, float]]  # (value, shade 0..1)


@dataclass(frozen=True)
class Heatmap:
    columns: list[Column]
    rows: list[HeatRow]
    hidden_columns: int
    special_rows: int


def heatmap(token_features: list[dict[str, Any]], *, labels: dict[int, str], include_special: bool = False,
            per_column: bool = False, max_columns: int = 24) -> Heatmap:
    frames = []
    for i, frame in enumerate(token_features or []):
        token = str(frame.get("token", ""))
        features = {int(k): float(v) for k, v in (frame.get("features") or {}).items()}  # JSON keys are strings
        frames.append((int(frame.get("position", i)), token, str(frame.get("type", "")), is_special(token), features))
    counted = [f for f in frames if include_special or not f[3]]
    # Whitespace tokens (the chat template's newlines) fire as hard as special ones: they keep their row
    # but do not choose the columns or set the scale.
    scored = [f for f in counted if include_special or f[1].strip()]
    peaks: dict[int, float] = {}
    generated_peaks: dict[int, float] = {}
    for _, _, kind, _, features in scored:
        for index, value in features.items():
            peaks[index] = max(peaks.get(index, value), value)
            if kind == "generated":
                generated_peaks[index] = max(generated_peaks.get(index, value), value)
    chosen = sorted(generated_peaks, key=lambda j: (-generated_peaks[j], j))[:max_columns // 2]
    for index in sorted(peaks, key=lambda j: (-peaks[j], j)):
        if len(chosen) >= max_columns:
            break
        if index not in chosen:
            chosen.append(index)
    # The answer's features first (the page is read left to right), then the prompt's.
    chosen.sort(key=lambda j: (j not in generated_peaks, -generated_peaks.get(j, peaks[j]), j))
    overall = max((peaks[j] for j in chosen), default=0.0) or 1.0
    columns = [Column(index=j, label=labels.get(j, ""), peak=peaks[j]) for j in chosen]
    rows = []
    for position, token, kind, special, features in (frames if include_special else counted):
        cells = []
        for column in columns:
            value = features.get(column.index)
            scale = (column.peak or 1.0) if per_column else overall
            cells.append((value, 0.0 if value is None else max(0.0, min(1.0, value / scale))))
        rows.append(HeatRow(position=position, token=token, kind=kind, special=special, cells=cells))
    return Heatmap(columns=columns, rows=rows, hidden_columns=max(0, len(peaks) - len(columns)),
                   special_rows=sum(1 for f in frames if f[3]))
