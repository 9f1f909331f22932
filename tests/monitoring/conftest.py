"""History rows made fast (bulk_create with chosen timestamps), and the real inference worker fixture."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from django.utils import timezone

from monitoring.models import RequestRecord
from tests.api.conftest import inference_worker, two_saes_serving  # noqa: F401 - shared fixtures, function scoped

NOW = timezone.now().replace(microsecond=0)


def record(i: int, **fields) -> RequestRecord:
    defaults = dict(
        request_id=f"req-{i:05d}", endpoint="chat.completions", model_name="tiny-llama", profile_name="",
        status="completed", prompt=f"prompt number {i}", output=f"output number {i}",
        parameters={"max_tokens": 16}, steering={"source": "active"}, prompt_tokens=5, completion_tokens=7,
        latency_ms=120.0 + i, ttft_ms=15.0,
        token_features=[{"position": 0, "token": "Hi", "features": {"7": 1.5, "12": 0.25}}],
    )
    return RequestRecord(**{**defaults, **fields})


def store(records: list[RequestRecord], *, created: list[datetime] | None = None) -> list[RequestRecord]:
    """bulk_create, then set created_at (auto_now_add ignores a given value on insert)."""
    saved = RequestRecord.objects.bulk_create(records)
    stamps = created or [NOW - timedelta(minutes=i) for i in range(len(saved))]
    for row, stamp in zip(saved, stamps, strict=True):
        row.created_at = stamp
    RequestRecord.objects.bulk_update(saved, ["created_at"], batch_size=500)
    return saved


@pytest.fixture
def many_records(db):
    """1,000 requests over ~16 hours: 4 models, 3 statuses, a profile on every 5th."""
    statuses = ["completed"] * 8 + ["error", "cancelled"]
    rows = [record(i, model_name=f"model-{i % 4}", status=statuses[i % 10],
                   profile_name="yelling" if i % 5 == 0 else "",
                   prompt=f"prompt {i} about {'cats' if i % 7 == 0 else 'dogs'}")
            for i in range(1000)]
    return store(rows)


def streamed(response) -> bytes:
    """The body of a StreamingHttpResponse fed by an async iterator (as the ASGI server reads it)."""
    from asgiref.sync import async_to_sync

    async def collect() -> bytes:
        return b"".join([piece async for piece in response.streaming_content])

    return async_to_sync(collect)()
