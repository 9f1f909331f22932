"""The history service and selectors: write, filter, page, detail, delete, retention."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command

from millm_site.errors import NotFound, ValidationFailed
from monitoring import history
from monitoring.history_selectors import (
    HistoryFilters,
    history_choices,
    history_page,
    history_record_get,
    token_feature_table,
)
from monitoring.models import RequestRecord
from tests.monitoring.conftest import NOW, record, store

pytestmark = pytest.mark.django_db

CREATE_ARGS = dict(endpoint="chat.completions", model_name="tiny-llama", profile_name="yelling", status="completed",
                   prompt="Hello", output="HI THERE", parameters={"temperature": 0.0},
                   steering={"source": "profile:yelling", "features": [{"index": 7, "strength": 5.0}]},
                   prompt_tokens=3, completion_tokens=2, latency_ms=42.5, ttft_ms=7.5,
                   token_features=[{"position": 0, "token": "HI", "features": {7: 3.5}}], error_message="")


def test_request_record_create_stores_every_field():
    created = history.request_record_create(request_id="req-abc", **CREATE_ARGS)
    stored = RequestRecord.objects.get(request_id="req-abc")
    assert stored.pk == created.pk
    assert (stored.model_name, stored.profile_name, stored.output) == ("tiny-llama", "yelling", "HI THERE")
    assert stored.steering["features"] == [{"index": 7, "strength": 5.0}]
    assert stored.token_features == [{"position": 0, "token": "HI", "features": {"7": 3.5}}]
    assert (stored.latency_ms, stored.ttft_ms, stored.prompt_tokens, stored.completion_tokens) == (42.5, 7.5, 3, 2)


def test_request_record_create_rejects_an_unknown_status_and_cuts_long_names():
    with pytest.raises(ValidationFailed):
        history.request_record_create(request_id="req-bad", **{**CREATE_ARGS, "status": "weird"})
    history.request_record_create(request_id="r" * 100, **{**CREATE_ARGS, "model_name": "m" * 300})
    stored = RequestRecord.objects.get()
    assert len(stored.request_id) == 64 and len(stored.model_name) == 100


def test_a_missing_request_id_gets_a_unique_one_instead_of_a_collision():
    first = history.request_record_create(request_id="", **CREATE_ARGS)
    second = history.request_record_create(request_id="", **CREATE_ARGS)
    assert first.request_id.startswith("req-") and first.request_id != second.request_id


def test_request_record_create_is_keyword_only():
    with pytest.raises(TypeError):
        history.request_record_create("req-positional", **CREATE_ARGS)  # type: ignore[misc]


def test_pages_are_newest_first_without_overlap(many_records):
    first = history_page(filters=HistoryFilters(), page=1, page_size=200)
    second = history_page(filters=HistoryFilters(), page=2, page_size=200)
    assert (first.total, first.pages) == (1000, 5)
    assert first.items[0]["request_id"] == "req-00000"  # the newest
    stamps = [i["created_at"] for i in first.items + second.items]
    assert stamps == sorted(stamps, reverse=True)
    assert not {i["request_id"] for i in first.items} & {i["request_id"] for i in second.items}
    assert "token_features" not in first.items[0] and first.items[0]["prompt_preview"].startswith("prompt 0")


def test_page_size_is_capped_and_a_page_past_the_end_is_empty(many_records):
    assert len(history_page(filters=HistoryFilters(), page_size=5000).items) == 200
    past = history_page(filters=HistoryFilters(), page=99, page_size=50)
    assert past.items == [] and past.total == 1000


@pytest.mark.parametrize("filters,expected", [
    (HistoryFilters(model="model-1"), 250),
    (HistoryFilters(status="error"), 100),
    (HistoryFilters(profile="yelling"), 200),
    (HistoryFilters(model="model-0", profile="yelling"), 50),
    (HistoryFilters(q="cats"), 143),
    (HistoryFilters(q="CATS", status="error"), 14),
    (HistoryFilters(q="req-00042"), 1),
    (HistoryFilters(since=NOW - timedelta(minutes=9, seconds=30)), 10),
    (HistoryFilters(until=NOW - timedelta(minutes=989, seconds=30)), 10),
    (HistoryFilters(endpoint="completions"), 0),
])
def test_filters(many_records, filters, expected):
    page = history_page(filters=filters, page_size=200)
    assert page.total == expected
    for item in page.items:
        assert not filters.model or item["model_name"] == filters.model
        assert not filters.status or item["status"] == filters.status


def test_choices_list_what_is_stored(many_records):
    assert history_choices() == {"models": ["model-0", "model-1", "model-2", "model-3"], "profiles": ["yelling"],
                                 "endpoints": ["chat.completions"]}


def test_detail_and_missing_record(many_records):
    assert history_record_get(request_id="req-00007").prompt == "prompt 7 about cats"
    with pytest.raises(NotFound) as caught:
        history_record_get(request_id="req-nope")
    assert caught.value.status == 404


def test_delete_everything_or_only_older(many_records):
    assert history.history_delete(before=NOW - timedelta(minutes=899, seconds=30)) == 100
    assert RequestRecord.objects.count() == 900
    assert history.history_delete() == 900
    assert not RequestRecord.objects.exists()


def test_retention_drops_only_what_is_older_than_the_window(db, settings):
    store([record(i) for i in range(4)], created=[NOW, NOW - timedelta(days=2), NOW - timedelta(days=9),
                                                   NOW - timedelta(days=40)])
    settings.HISTORY_RETENTION_DAYS = 0
    assert history.history_retention_apply() == 0  # 0 keeps everything
    assert history.history_retention_apply(days=7, now=NOW) == 2
    assert sorted(RequestRecord.objects.values_list("request_id", flat=True)) == ["req-00000", "req-00001"]


def test_retention_runs_from_create_at_most_once_an_hour(db, settings, monkeypatch):
    settings.HISTORY_RETENTION_DAYS = 1
    store([record(1)], created=[NOW - timedelta(days=3)])
    monkeypatch.setattr(history, "_retention_checked_at", -float("inf"))
    history.request_record_create(request_id="req-new", **CREATE_ARGS)
    assert list(RequestRecord.objects.values_list("request_id", flat=True)) == ["req-new"]
    store([record(2)], created=[NOW - timedelta(days=3)])
    history.request_record_create(request_id="req-newer", **CREATE_ARGS)  # within the hour: not applied again
    assert RequestRecord.objects.count() == 3
    checked = history._retention_checked_at
    assert history.history_retention_apply_if_due(clock=lambda: checked + history.RETENTION_CHECK_EVERY_S + 1) == 1


def test_apply_retention_command(db, settings):
    store([record(i) for i in range(3)], created=[NOW, NOW - timedelta(days=31), NOW - timedelta(days=60)])
    settings.HISTORY_RETENTION_DAYS = 30
    out = StringIO()
    call_command("apply_retention", stdout=out)
    assert "Deleted 2 request(s)" in out.getvalue()
    assert RequestRecord.objects.count() == 1
    out = StringIO()
    call_command("apply_retention", "--days", "0", stdout=out)
    assert "Retention is off" in out.getvalue() and RequestRecord.objects.count() == 1


def test_token_feature_table_ranks_columns_by_peak():
    frames = [{"position": 0, "type": "prompt", "token": "Hi", "features": {"7": 1.0, "3": 4.0}},
              {"position": 1, "token": "!", "features": {"7": 2.0, "9": 0.5}}]
    table = token_feature_table(frames, max_columns=2)
    assert table.columns == [3, 7] and table.hidden_columns == 1
    assert [(r.position, r.kind, r.token) for r in table.rows] == [(0, "prompt", "Hi"), (1, "", "!")]
    assert table.rows[0].cells == [(4.0, 1.0), (1.0, 0.25)]
    assert table.rows[1].cells == [(None, 0.0), (2.0, 0.5)]
    assert token_feature_table([]).rows == []
