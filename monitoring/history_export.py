"""Request history as CSV or JSON, streamed in batches so an export of any size holds little memory.

One sync iterator produces the text; the HTTP response consumes it asynchronously (one thread hop per
batch), because under ASGI Django would buffer a sync iterator whole before sending a byte.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any, Literal

from asgiref.sync import sync_to_async
from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import Q
from django.http import StreamingHttpResponse
from django.utils import timezone

from monitoring.history_selectors import DETAIL_FIELDS, HistoryFilters, history_filter

ExportFormat = Literal["csv", "json"]
EXPORT_BATCH = 500
JSON_COLUMNS = ("parameters", "steering", "token_features")
FREE_TEXT_COLUMNS = ("prompt", "output", "error_message")
CONTENT_TYPES = {"csv": "text/csv; charset=utf-8", "json": "application/json"}


def history_export_batch(*, filters: HistoryFilters, after: tuple[datetime, int] | None,
                         size: int = EXPORT_BATCH) -> list[dict[str, Any]]:
    """The next `size` records (newest first) after the (created_at, id) key of the previous batch."""
    records = history_filter(filters=filters)
    if after is not None:
        created_at, pk = after
        records = records.filter(Q(created_at__lt=created_at) | Q(created_at=created_at, id__lt=pk))
    return list(records.order_by("-created_at", "-id").values("id", *DETAIL_FIELDS)[:size])


def _records(filters: HistoryFilters, batch: int) -> Iterator[list[dict[str, Any]]]:
    after = None
    while rows := history_export_batch(filters=filters, after=after, size=batch):
        after = (rows[-1]["created_at"], rows[-1]["id"])
        for row in rows:
            del row["id"]
        yield rows
        if len(rows) < batch:
            return


def _csv_cell(column: str, value: Any) -> Any:
    if column in JSON_COLUMNS:
        return json.dumps(value, cls=DjangoJSONEncoder)
    if isinstance(value, datetime):
        return value.isoformat()
    if column in FREE_TEXT_COLUMNS and isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        # Spreadsheets run cells starting like a formula; a leading quote keeps prompts inert (OWASP CSV injection).
        return "'" + value
    return value


def history_export_iter(*, filters: HistoryFilters, fmt: ExportFormat, batch: int = EXPORT_BATCH) -> Iterator[str]:
    """The export's text, one piece per batch (the CSV header rides with the first), as CSV or one JSON array."""
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(DETAIL_FIELDS)
        for rows in _records(filters, batch):
            writer.writerows([_csv_cell(c, row[c]) for c in DETAIL_FIELDS] for row in rows)
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
        if buffer.tell():
            yield buffer.getvalue()  # the header of an empty export
        return
    yield "["
    separator = "\n"
    for rows in _records(filters, batch):
        yield separator + ",\n".join(json.dumps(row, cls=DjangoJSONEncoder) for row in rows)
        separator = ",\n"
    yield "\n]\n"


async def _async_pieces(pieces: Iterator[str]) -> AsyncIterator[str]:
    # thread_sensitive: every batch query runs on the same thread, as Django's connection handling expects.
    step = sync_to_async(next, thread_sensitive=True)
    while (piece := await step(pieces, None)) is not None:
        yield piece


def history_export_response(*, filters: HistoryFilters, fmt: ExportFormat) -> StreamingHttpResponse:
    pieces = history_export_iter(filters=filters, fmt=fmt)
    response = StreamingHttpResponse(_async_pieces(pieces), content_type=CONTENT_TYPES[fmt])
    stamp = timezone.now().strftime("%Y%m%dT%H%M%SZ")
    response["Content-Disposition"] = f'attachment; filename="millm-history-{stamp}.{fmt}"'
    return response
