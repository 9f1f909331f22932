"""Request history writes: record a finished /v1 request, delete history, apply the retention window.

Reads (pages, filters, detail) are in `history_selectors.py`, exports in `history_export.py`.
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import structlog
from django.conf import settings
from django.utils import timezone

from millm_site.errors import ValidationFailed
from monitoring.models import RequestRecord, RequestStatus

log = structlog.get_logger("millm.history")

RETENTION_CHECK_EVERY_S = 3600.0  # how often a process applies retention on its own, from request_record_create
_retention_lock = threading.Lock()
_retention_checked_at = -float("inf")


def _fit(value: str, field: str) -> str:
    """Cut a string to its column: a long name must never make the history write (and the request) fail."""
    limit = RequestRecord._meta.get_field(field).max_length
    return (value or "")[:limit]


def request_record_create(
    *,
    request_id: str,
    endpoint: str,
    model_name: str,
    profile_name: str,
    status: str,
    prompt: str,
    output: str,
    parameters: dict[str, Any],
    steering: dict[str, Any],
    prompt_tokens: int,
    completion_tokens: int,
    latency_ms: float | None,
    ttft_ms: float | None,
    token_features: list[dict[str, Any]],
    error_message: str,
) -> RequestRecord:
    """Store one finished request; token_features is a list of {position, token, features: {index: value}}."""
    if status not in RequestStatus.values:
        raise ValidationFailed(f"status must be one of {', '.join(RequestStatus.values)}", details={"status": status})
    record = RequestRecord.objects.create(
        # A missing id must not collide with another (request_id is unique) and lose the record.
        request_id=_fit(request_id or f"req-{uuid.uuid4().hex}", "request_id"),
        endpoint=_fit(endpoint, "endpoint"),
        model_name=_fit(model_name, "model_name"),
        profile_name=_fit(profile_name, "profile_name"),
        status=status,
        prompt=prompt or "",
        output=output or "",
        parameters=parameters or {},
        steering=steering or {},
        prompt_tokens=max(0, int(prompt_tokens or 0)),
        completion_tokens=max(0, int(completion_tokens or 0)),
        latency_ms=latency_ms,
        ttft_ms=ttft_ms,
        token_features=token_features or [],
        error_message=error_message or "",
    )
    history_retention_apply_if_due()
    return record


def history_delete(*, before: datetime | None = None) -> int:
    """Delete every stored request, or only those created before `before`; returns how many went."""
    records = RequestRecord.objects.all()
    if before is not None:
        records = records.filter(created_at__lt=before)
    # The table has no relations or signals, so Django issues one DELETE statement, not a row loop.
    deleted, _ = records.delete()
    log.info("history_deleted", deleted=deleted, before=before.isoformat() if before else None)
    return deleted


def history_retention_cutoff(*, days: int | None = None, now: datetime | None = None) -> datetime | None:
    """The instant before which requests are dropped; None when retention is off (0 days)."""
    keep_days = settings.HISTORY_RETENTION_DAYS if days is None else days
    if keep_days <= 0:
        return None
    return (now or timezone.now()) - timedelta(days=keep_days)


def history_retention_apply(*, days: int | None = None, now: datetime | None = None) -> int:
    """Drop requests older than the retention window (MILLM_HISTORY_RETENTION_DAYS unless `days`)."""
    cutoff = history_retention_cutoff(days=days, now=now)
    return 0 if cutoff is None else history_delete(before=cutoff)


def history_retention_apply_if_due(*, clock=time.monotonic) -> int:
    """Apply retention at most once an hour per process, so it holds without a cron job."""
    global _retention_checked_at
    with _retention_lock:
        if clock() - _retention_checked_at < RETENTION_CHECK_EVERY_S:
            return 0
        _retention_checked_at = clock()
    return history_retention_apply()
