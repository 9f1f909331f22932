"""Feature labels from a Neuronpedia-style explanations export (JSON list or CSV)."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from millm_site.errors import ValidationFailed
from millm_site.json_body import unencodable_path

LABEL_KEYS = ("description", "label", "explanation")


def parse_labels(content: str) -> list[tuple[int, str, str, float | None]]:
    """(index, label, description, max_activation) rows; refuses the whole file on the first bad row."""
    text = content.strip()
    if not text:
        raise ValidationFailed("file: empty", details={"field": "file"})
    rows: list[dict[str, Any]]
    if text[0] in "[{":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValidationFailed(f"file: not valid JSON ({exc.msg} at line {exc.lineno})",
                                   details={"field": "file"}) from None
        if (where := unencodable_path(data)) is not None:  # a "\ud800" escape: not text the database can store
            raise ValidationFailed(f"file: {'.'.join(where) or 'a string'} holds a lone UTF-16 surrogate",
                                   details={"field": "file"})
        rows = data.get("explanations", data.get("features", [])) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise ValidationFailed("file: expected a list of explanations", details={"field": "file"})
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    parsed = []
    first_row: dict[int, int] = {}
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValidationFailed(f"row {number}: expected an object", details={"field": f"[{number}]"})
        raw_index = row.get("index", row.get("feature", row.get("featureIndex")))
        try:
            text_index = str(raw_index).strip()
            if len(text_index) > 20:  # no SAE is that wide; also keeps the message short
                raise ValueError
            index = int(text_index)
        except (TypeError, ValueError):
            raise ValidationFailed(f"row {number}: index {str(raw_index)[:40]!r} is not an integer",
                                   details={"field": f"[{number}].index"}) from None
        if index in first_row:
            raise ValidationFailed(f"row {number}: feature index {index} is listed twice (first in row "
                                   f"{first_row[index]}); the file is refused whole",
                                   details={"field": f"[{number}].index", "index": index})
        first_row[index] = number
        label = next((str(row[k]).strip() for k in LABEL_KEYS if row.get(k)), "")
        if not label:
            raise ValidationFailed(f"row {number}: no description/label", details={"field": f"[{number}].description"})
        parsed.append((index, label[:300], label if len(label) > 300 else "", None))
    return parsed
