"""/ws/system/ in process (real Redis channel layer): the first client starts the feed, the last stops it."""

from __future__ import annotations

import asyncio
import json

import pytest
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from millm_site.routing import websocket_urlpatterns
from monitoring import metrics
from monitoring.metrics import MetricsRegistry
from monitoring.system_status import system_publisher

# Consumers close stale database connections on connect (channels.db), and the system feed reads the
# inference processes on record: allow the access rather than depend on which test ran before.
pytestmark = pytest.mark.django_db(transaction=True)


def test_system_status_arrives_as_json_and_as_html_fragments(settings, monkeypatch):
    settings.SYSTEM_INTERVAL_S = 0.3  # also bounds the ping wait: no inference process runs here
    monkeypatch.setattr(system_publisher, "tracker", None)  # a fresh cooldown clock for this test
    monkeypatch.setattr(metrics, "registry", MetricsRegistry())  # no request counted by earlier tests
    app = URLRouter(websocket_urlpatterns)

    async def next_of_kind(ws: WebsocketCommunicator, kind: str) -> dict:
        while True:
            event = json.loads(await ws.receive_from(timeout=5))
            if event["kind"] == kind:
                return event["payload"]

    async def scenario():
        as_json = WebsocketCommunicator(app, "/ws/system/?format=json")
        as_html = WebsocketCommunicator(app, "/ws/system/")
        assert (await as_json.connect())[0] and (await as_html.connect())[0]
        assert system_publisher.running
        status = await next_of_kind(as_json, "system_status")
        assert status["inference"] == {"up": False} and status["lights"]["inference"] == "red"
        assert 0 < status["memory"]["used_bytes"] <= status["memory"]["total_bytes"]
        assert status["process_rss_bytes"] > 0 and status["throughput_history"]
        alert = await next_of_kind(as_json, "alert")  # no inference process: a red light
        assert alert["kind"] == "inference" and alert["level"] == "red"
        fragments = [await as_html.receive_from(timeout=5) for _ in range(4)]
        joined = "".join(fragments)
        assert 'id="system-status" class="status-dot status-live status-red"' in joined
        assert 'id="system-live" hx-swap-oob="innerHTML"' in joined
        await as_json.disconnect()
        assert system_publisher.running  # the HTML client still listens
        await as_html.disconnect()
        await asyncio.sleep(0)
        assert not system_publisher.running

    asyncio.run(scenario())
