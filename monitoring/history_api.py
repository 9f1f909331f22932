"""/api/monitoring/history: page, detail, delete, export of the stored requests.

Thin endpoints: they validate the query and call one selector or service.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

from django.utils import timezone
from ninja import Field, Query, Router, Schema

from millm_site.envelope import envelope
from millm_site.errors import ValidationFailed
from monitoring import history
from monitoring.history_export import history_export_response
from monitoring.history_selectors import (
    MAX_PAGE_SIZE,
    HistoryFilters,
    history_page,
    history_record_as_dict,
    history_record_get,
)

router = Router(tags=["history"])


def _aware(moment: datetime | None) -> datetime | None:
    # A time without a zone is UTC (the server's TIME_ZONE), never "whatever the host says".
    return moment.replace(tzinfo=UTC) if moment is not None and timezone.is_naive(moment) else moment


class HistoryQuery(Schema):
    model: str = ""
    profile: str = ""
    status: Literal["completed", "cancelled", "error"] | None = None
    endpoint: str = ""
    since: datetime | None = Field(None, description="created at or after (ISO 8601; no zone = UTC)")
    until: datetime | None = Field(None, description="created before (ISO 8601; no zone = UTC)")
    q: str = Field("", description="text in the prompt or the output, or an exact request id")

    def filters(self) -> HistoryFilters:
        return HistoryFilters(model=self.model, profile=self.profile, status=self.status or "",
                              endpoint=self.endpoint, since=_aware(self.since), until=_aware(self.until), q=self.q)


MAX_PAGE = 1_000_000  # page * page_size stays far inside the database's 64-bit OFFSET
MAX_AGE_DAYS = 36_500  # a hundred years: "now - days" stays a valid datetime


class HistoryPageQuery(HistoryQuery):
    page: int = Field(1, ge=1, le=MAX_PAGE)
    page_size: int = Field(50, ge=1, le=MAX_PAGE_SIZE)


class HistoryExportQuery(HistoryQuery):
    format: Literal["csv", "json"] = "csv"


class HistoryDeleteQuery(Schema):
    before: datetime | None = Field(None, description="delete requests created before this instant")
    older_than_days: float | None = Field(None, gt=0, le=MAX_AGE_DAYS, allow_inf_nan=False,
                                          description="delete requests older than this many days")


@router.get("/monitoring/history", summary="Stored requests, newest first, paginated and filtered",
            tags=["history"])
def history_list(request, query: Query[HistoryPageQuery]):
    page = history_page(filters=query.filters(), page=query.page, page_size=query.page_size)
    return envelope(page.as_dict())


@router.delete("/monitoring/history", summary="Delete all stored requests, or those older than a time",
               tags=["history"])
def history_clear(request, query: Query[HistoryDeleteQuery]):
    if query.before is not None and query.older_than_days is not None:
        raise ValidationFailed("give before or older_than_days, not both")
    before = _aware(query.before)
    if query.older_than_days is not None:
        before = timezone.now() - timedelta(days=query.older_than_days)
    return envelope({"deleted": history.history_delete(before=before)})


@router.get("/monitoring/history/export", summary="The filtered history as a CSV or JSON file (streamed)",
            tags=["history"])
async def history_export(request, query: Query[HistoryExportQuery]):
    return history_export_response(filters=query.filters(), fmt=query.format)


@router.get("/monitoring/history/{request_id}", summary="One stored request, with its per-token features",
            tags=["history"])
def history_detail(request, request_id: str):
    return envelope(history_record_as_dict(history_record_get(request_id=request_id)))
