"""History and System pages render; the history filter form answers htmx with table rows only."""

from __future__ import annotations

import pytest

from monitoring.system_status import system_publisher, system_status_build
from tests.monitoring.conftest import record, store
from tests.monitoring.test_alerts import HOST, QUIET, THRESHOLDS

pytestmark = pytest.mark.django_db


@pytest.fixture
def records(db):
    frames = [{"position": 0, "token": "Hel", "features": {"7": 2.0, "3": 0.5}},
              {"position": 1, "token": "lo", "features": {"3": 1.0}}]
    return store([record(i, model_name="a" if i % 2 else "b", token_features=frames,
                         prompt="<script>alert(1)</script>" if i == 3 else f"prompt {i}") for i in range(60)])


def test_history_page_lists_filters_and_links_everything(client, records):
    html = client.get("/history/").content.decode()
    assert "<h1>History</h1>" in html and 'id="history-rows"' in html
    assert 'href="/history/"' in html and 'href="/system/"' in html and 'aria-current="page">History' in html
    assert html.count('class="history-row"') == 50 and "60 requests" in html and "page 1 of 2" in html
    assert 'href="/history/req-00000/"' in html
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html
    assert 'href="/history/export?format=csv"' in html
    assert '<option value="a"' in html and '<option value="b"' in html


def test_htmx_filtering_returns_only_rows_with_matching_pager_and_export(client, records):
    response = client.get("/history/", {"model": "a", "page": "2", "q": "number"}, HTTP_HX_REQUEST="true",
                          HTTP_HX_TARGET="history-rows")
    html = response.content.decode()
    assert "<html" not in html and "<thead" not in html
    assert "30 requests" in html and "page 1 of 1" in html  # page 2 no longer exists: the last one is shown
    assert html.count('class="history-row"') == 30
    assert 'href="/history/export?format=json&amp;model=a&amp;q=number"' in html


def test_invalid_filters_are_reported_not_fatal(client, records):
    response = client.get("/history/", {"since": "not a date", "status": "weird"})
    assert response.status_code == 200
    html = response.content.decode()
    assert "error-box" in html and html.count('class="history-row"') == 50


def test_detail_page_shows_the_token_feature_table(client, records):
    html = client.get("/history/req-00002/").content.decode()
    assert "<code>req-00002</code>" in html and "prompt 2" in html and "output number 2" in html
    assert html.index('<span class="col-index">#7</span>') < html.index('<span class="col-index">#3</span>')  # strongest first
    assert '<td class="token">Hel</td>' in html and "rgba(59, 91, 219, 1.00)" in html
    assert client.get("/history/req-none/").status_code == 404


def test_system_page_before_and_after_a_sample(client, monkeypatch):
    monkeypatch.setattr(system_publisher, "last_status", None)
    html = client.get("/system/").content.decode()
    assert "<h1>System</h1>" in html and 'ws-connect="/ws/system/"' in html and "Waiting for the first sample" in html
    status = system_status_build(host=HOST, pong={"pid": 9, "loaded_model": "tiny", "tokens_per_second": 12.0},
                                 recent=QUIET, thresholds=THRESHOLDS)
    status["throughput_history"] = [0.0, 6.0, 12.0]
    monkeypatch.setattr(system_publisher, "last_status", status)
    monkeypatch.setattr(system_publisher, "alerts", [{"level": "red", "message": "memory 95% used", "timestamp": "t"}])
    html = client.get("/system/").content.decode()
    assert 'class="light light-green" data-kind="inference"' in html and "12.0" in html
    assert 'points="0.0,46.0 120.0,24.0 240.0,2.0"' in html
    assert "memory 95% used" in html and 'aria-current="page">System' in html


def test_system_api_snapshot(client, settings):
    settings.INFERENCE_TIMEOUT_S = 0.2
    body = client.get("/api/monitoring/system").json()
    assert body["success"] is True
    assert body["data"]["inference"] == {"up": False} and "recent_alerts" in body["data"]
