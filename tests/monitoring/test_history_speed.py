"""1,000 stored requests: each page, filter and export answers in under 100 ms (median of 5, warm)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from datetime import timedelta

import pytest

from monitoring.history_export import history_export_iter
from monitoring.history_selectors import HistoryFilters, history_page
from tests.monitoring.conftest import NOW

pytestmark = pytest.mark.django_db
BOUND_S = 0.100


def median_seconds(action: Callable[[], object], runs: int = 5) -> float:
    action()  # warm: the first query pays for statement preparation and caches
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


CASES = {
    "page 1 (50)": (HistoryFilters(), 1, 50),
    "page 10 (50)": (HistoryFilters(), 10, 50),
    "page 1 (200)": (HistoryFilters(), 1, 200),
    "model filter": (HistoryFilters(model="model-2"), 2, 50),
    "status filter": (HistoryFilters(status="error"), 1, 50),
    "profile+model": (HistoryFilters(profile="yelling", model="model-0"), 1, 50),
    "time range": (HistoryFilters(since=NOW - timedelta(hours=10), until=NOW - timedelta(hours=2)), 3, 50),
    "text search": (HistoryFilters(q="cats"), 2, 50),
}


@pytest.mark.parametrize("case", list(CASES))
def test_selector_pages_are_fast(many_records, case):
    filters, page, size = CASES[case]
    assert history_page(filters=filters, page=page, page_size=size).items
    took = median_seconds(lambda: history_page(filters=filters, page=page, page_size=size))
    print(f"\n[history speed] selector {case}: {took * 1000:.1f} ms")
    assert took < BOUND_S, f"{case}: {took * 1000:.1f} ms"


@pytest.mark.parametrize("path", ["/history/?status=completed&page=3", "/api/monitoring/history?page_size=200&q=dogs"])
def test_page_and_api_answers_are_fast(client, many_records, path):
    assert client.get(path).status_code == 200
    took = median_seconds(lambda: client.get(path))
    print(f"\n[history speed] GET {path}: {took * 1000:.1f} ms")
    assert took < BOUND_S, f"{path}: {took * 1000:.1f} ms"


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_exporting_all_1000_stays_under_100_ms_per_200_rows(many_records, fmt):
    text = "".join(history_export_iter(filters=HistoryFilters(), fmt=fmt))
    assert text.count("req-0") == 1000
    took = median_seconds(lambda: "".join(history_export_iter(filters=HistoryFilters(), fmt=fmt)), runs=3)
    print(f"\n[history speed] export 1,000 as {fmt}: {took * 1000:.1f} ms")
    assert took < BOUND_S * 1000 / 200, f"{fmt}: {took * 1000:.1f} ms"
