"""/api/monitoring/history: envelope, pagination, filters, detail, delete, export; and who needs the API key."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta

import pytest

from monitoring.models import RequestRecord
from tests.monitoring.conftest import NOW, record, store, streamed

pytestmark = pytest.mark.django_db
URL = "/api/monitoring/history"


@pytest.fixture
def six(db):
    return store([record(i, model_name="a" if i < 4 else "b", status="error" if i == 5 else "completed")
                  for i in range(6)])


def test_list_is_an_envelope_with_pagination(client, six):
    body = client.get(URL, {"page": 2, "page_size": 4}).json()
    assert body["success"] is True and body["error"] is None
    data = body["data"]
    assert (data["page"], data["page_size"], data["total"], data["pages"]) == (2, 4, 6, 2)
    assert [i["request_id"] for i in data["items"]] == ["req-00004", "req-00005"]
    assert "token_features" not in data["items"][0]


def test_list_filters(client, six):
    def ids(**params):
        return [i["request_id"] for i in client.get(URL, params).json()["data"]["items"]]

    assert ids(model="b") == ["req-00004", "req-00005"]
    assert ids(status="error") == ["req-00005"]
    assert ids(q="number 3") == ["req-00003"]
    since = (NOW - timedelta(minutes=1, seconds=30)).replace(tzinfo=None).isoformat()  # no zone: UTC
    assert ids(since=since) == ["req-00000", "req-00001"]
    assert ids(until=(NOW - timedelta(minutes=4, seconds=30)).isoformat()) == ["req-00005"]


@pytest.mark.parametrize("params,field", [({"page_size": 201}, "page_size"), ({"page": 0}, "page"),
                                          ({"status": "done"}, "status"), ({"since": "yesterday"}, "since")])
def test_bad_queries_are_validation_errors(client, six, params, field):
    response = client.get(URL, params)
    assert response.status_code == 422
    body = response.json()
    assert body["success"] is False and body["data"] is None
    assert body["error"]["code"] == "VALIDATION_ERROR" and field in body["error"]["message"]


def test_detail_and_missing(client, six):
    body = client.get(f"{URL}/req-00002").json()
    assert body["success"] is True
    assert body["data"]["token_features"][0]["features"] == {"7": 1.5, "12": 0.25}
    assert body["data"]["prompt"] == "prompt number 2"
    missing = client.get(f"{URL}/req-nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "NOT_FOUND"


def test_delete_older_than_then_everything(client, six):
    before = (NOW - timedelta(minutes=3, seconds=30)).isoformat()
    assert client.delete(f"{URL}?before={before.replace('+', '%2B')}").json()["data"] == {"deleted": 2}
    assert RequestRecord.objects.count() == 4
    assert client.delete(f"{URL}?older_than_days=1").json()["data"] == {"deleted": 0}
    assert client.delete(URL).json() == {"success": True, "data": {"deleted": 4}, "error": None}
    assert not RequestRecord.objects.exists()


def test_delete_refuses_two_cutoffs(client, six):
    response = client.delete(f"{URL}?older_than_days=1&before=2020-01-01T00:00:00")
    assert response.status_code == 422 and response.json()["error"]["code"] == "VALIDATION_ERROR"
    assert RequestRecord.objects.count() == 6


def test_export_csv_and_json_files_with_filters(client, six):
    response = client.get(f"{URL}/export", {"format": "csv", "model": "b"})
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"] and ".csv" in response["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(streamed(response).decode())))
    assert [r["request_id"] for r in rows] == ["req-00004", "req-00005"]
    response = client.get(f"{URL}/export", {"format": "json", "status": "error"})
    assert response["Content-Type"] == "application/json"
    assert [d["request_id"] for d in json.loads(streamed(response))] == ["req-00005"]
    assert client.get(f"{URL}/export", {"format": "xml"}).status_code == 422


def test_history_needs_the_api_key_but_metrics_does_not(client, six, settings):
    settings.MILLM_API_KEY = "sekret"
    settings.INFERENCE_TIMEOUT_S = 0.2
    assert client.get(URL).status_code == 401
    assert client.get(URL, HTTP_AUTHORIZATION="Bearer sekret").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_the_page_export_link_needs_the_key_then_downloads_in_the_logged_in_session(client, six, settings):
    settings.MILLM_API_KEY = "sekret"
    anonymous = client.get("/history/export", {"format": "json", "model": "a"})
    assert anonymous.status_code == 302 and anonymous["Location"].startswith("/login/")  # it dumps every prompt
    assert client.post("/login/", {"key": "sekret"}).status_code == 302
    response = client.get("/history/export", {"format": "json", "model": "a"})
    assert response.status_code == 200
    assert len(json.loads(streamed(response))) == 4
