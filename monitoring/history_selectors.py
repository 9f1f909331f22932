"""Request history reads: filter, page, one record, and the token-by-feature table of its detail view.

Pages read `.values()` of the summary columns with SQL-side previews of prompt and output, so a page
never loads token_features or whole outputs; the (column, -created_at) indexes serve each filter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db.models import Q, QuerySet
from django.db.models.functions import Substr

from millm_site.errors import NotFound
from monitoring.models import RequestRecord

PREVIEW_CHARS = 160
MAX_PAGE_SIZE = 200
SUMMARY_FIELDS = ("request_id", "created_at", "endpoint", "model_name", "profile_name", "status", "prompt_tokens",
                  "completion_tokens", "latency_ms", "ttft_ms", "error_message")
DETAIL_FIELDS = (*SUMMARY_FIELDS, "prompt", "output", "parameters", "steering", "token_features")


@dataclass(frozen=True)
class HistoryFilters:
    """What a history page, export or delete is narrowed to; empty strings mean "any"."""

    model: str = ""
    profile: str = ""
    status: str = ""
    endpoint: str = ""
    since: datetime | None = None
    until: datetime | None = None
    q: str = ""  # text in the prompt or the output, or an exact request id

    def as_query(self) -> dict[str, str]:
        """The filters as GET parameters (for pagination and export links)."""
        pairs = {"model": self.model, "profile": self.profile, "status": self.status, "endpoint": self.endpoint,
                 "since": self.since.isoformat() if self.since else "",
                 "until": self.until.isoformat() if self.until else "", "q": self.q}
        return {k: v for k, v in pairs.items() if v}


@dataclass
class HistoryPage:
    items: list[dict[str, Any]]
    page: int
    page_size: int
    total: int
    pages: int = field(init=False)

    def __post_init__(self) -> None:
        self.pages = max(1, math.ceil(self.total / self.page_size))

    def as_dict(self) -> dict[str, Any]:
        return {"items": self.items, "page": self.page, "page_size": self.page_size, "total": self.total,
                "pages": self.pages}


def history_filter(*, filters: HistoryFilters) -> QuerySet[RequestRecord]:
    records = RequestRecord.objects.all()
    exact = {"model_name": filters.model, "profile_name": filters.profile, "status": filters.status,
             "endpoint": filters.endpoint}
    records = records.filter(**{column: value for column, value in exact.items() if value})
    if filters.since is not None:
        records = records.filter(created_at__gte=filters.since)
    if filters.until is not None:
        records = records.filter(created_at__lt=filters.until)
    if text := filters.q.strip():
        records = records.filter(Q(prompt__icontains=text) | Q(output__icontains=text) | Q(request_id=text))
    return records


def history_page(*, filters: HistoryFilters, page: int = 1, page_size: int = 50) -> HistoryPage:
    """One page of request summaries, newest first; a page past the end is empty, not an error."""
    page = max(1, page)
    page_size = min(max(1, page_size), MAX_PAGE_SIZE)
    records = history_filter(filters=filters)
    total = records.count()
    start = (page - 1) * page_size
    rows = (records.annotate(prompt_preview=Substr("prompt", 1, PREVIEW_CHARS),
                             output_preview=Substr("output", 1, PREVIEW_CHARS))
            .values(*SUMMARY_FIELDS, "prompt_preview", "output_preview")[start:start + page_size])
    return HistoryPage(items=list(rows), page=page, page_size=page_size, total=total)


def history_record_get(*, request_id: str) -> RequestRecord:
    try:
        return RequestRecord.objects.get(request_id=request_id)
    except RequestRecord.DoesNotExist:
        raise NotFound(f"No stored request with id {request_id!r}", details={"request_id": request_id}) from None


def history_record_as_dict(record: RequestRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in DETAIL_FIELDS}


def history_choices() -> dict[str, list[str]]:
    """Distinct models, profiles and endpoints present, for the page's filter menus."""
    def distinct(column: str) -> list[str]:
        values = RequestRecord.objects.order_by(column).values_list(column, flat=True).distinct()
        return [v for v in values if v]

    return {"models": distinct("model_name"), "profiles": distinct("profile_name"),
            "endpoints": distinct("endpoint")}


@dataclass
class TokenFeatureRow:
    position: int
    token: str
    kind: str  # "prompt" or "generated" (empty when the frame did not say)
    cells: list[tuple[float | None, float]]  # (value, shade 0..1 relative to the table's peak)


@dataclass
class TokenFeatureTable:
    columns: list[int]
    rows: list[TokenFeatureRow]
    hidden_columns: int  # features left out beyond max_columns


def token_feature_table(token_features: list[dict[str, Any]], *, max_columns: int = 24) -> TokenFeatureTable:
    """Tokens as rows, the strongest features (by peak value over the request) as columns."""
    per_token: list[tuple[int, str, str, dict[int, float]]] = []
    peaks: dict[int, float] = {}
    for i, frame in enumerate(token_features or []):
        # Stored JSON turns integer keys into strings; accept both.
        features = {int(k): float(v) for k, v in (frame.get("features") or {}).items()}
        per_token.append((int(frame.get("position", i)), str(frame.get("token", "")), str(frame.get("type", "")),
                          features))
        for index, value in features.items():
            peaks[index] = max(peaks.get(index, value), value)
    ranked = sorted(peaks, key=lambda index: (-peaks[index], index))
    columns = ranked[:max_columns]
    peak = max((peaks[c] for c in columns), default=0.0)
    scale = peak if peak > 0 else 1.0
    rows = [TokenFeatureRow(position=position, token=token, kind=kind,
                            cells=[(features.get(c), max(0.0, min(1.0, features.get(c, 0.0) / scale)))
                                   for c in columns])
            for position, token, kind, features in per_token]
    return TokenFeatureTable(columns=columns, rows=rows, hidden_columns=max(0, len(ranked) - max_columns))
