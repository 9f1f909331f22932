"""The Monitor page's "Recent requests" refreshes itself (issue 12: it did not update live): the page polls
for its rows, and that request answers the rows alone, newest first, each linked to its detail."""

import pytest

from tests.monitoring.conftest import record, store

pytestmark = pytest.mark.django_db


def test_recent_requests_poll_returns_the_rows_alone(client):
    page = client.get("/monitor/").content.decode()
    assert 'id="recent-requests"' in page and 'hx-trigger="every 2s"' in page
    store([record(1, profile_name="paris-demo")])
    for _ in range(2):
        rows = client.get("/monitor/", HTTP_HX_REQUEST="true", HTTP_HX_TARGET="recent-requests").content.decode()
        assert rows.lstrip().startswith("<tr>") and "<html" not in rows
        assert 'href="/history/req-00001/"' in rows and "paris-demo" in rows
