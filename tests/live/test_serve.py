"""`make run`'s path end to end: the supervisor, embedded Redis, daphne, inference process, worker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import psutil
import pytest
import websockets


def children_by_name(stack) -> dict[str, psutil.Process]:
    found = {}
    for child in psutil.Process(stack.process.pid).children(recursive=False):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:  # a killed child is a zombie until the supervisor reaps it
            continue
        for name, marker in (("web", "daphne"), ("inference", "run_inference"), ("worker", "celery"),
                             ("redis", "redis-server")):
            if marker in cmd:
                found[name] = child
    return found


def test_stack_serves_the_demo_catalog(live_stack):
    health = httpx.get(f"{live_stack.url}/api/health").json()["data"]
    assert health == {**health, "status": "ok", "database": "ok", "redis": "ok"}
    assert set(children_by_name(live_stack)) == {"web", "inference", "worker", "redis"}
    page = httpx.get(f"{live_stack.url}/models/").text
    assert "tiny-llama" in page  # built and registered because the catalog was empty
    # ... and loaded and attached on start, so the first page can chat and steer at once.
    first = live_stack.first_health["inference"]
    assert (first["loaded_model"], first["attached_sae"]) == ("tiny-llama", "tiny-llama-layer_2")
    css = httpx.get(f"{live_stack.url}/static/vendor/htmx.min.js")
    assert css.status_code == 200 and len(css.content) > 40_000


def test_websocket_streams_events_as_json_and_html(live_stack):
    ws_url = live_stack.url.replace("http", "ws")

    async def scenario():
        async with websockets.connect(f"{ws_url}/ws/progress/?format=json") as as_json, \
                websockets.connect(f"{ws_url}/ws/progress/") as as_html:
            first = json.loads(await asyncio.wait_for(as_json.recv(), 5))
            assert first == {"kind": "connected", "payload": {"group": "progress"}}
            assert 'id="progress-log"' in await asyncio.wait_for(as_html.recv(), 5)

    asyncio.run(scenario())


def test_websocket_from_a_foreign_origin_is_refused(live_stack):
    ws_url = live_stack.url.replace("http", "ws")

    async def scenario():
        with pytest.raises(websockets.exceptions.InvalidStatus):
            async with websockets.connect(f"{ws_url}/ws/monitor/", origin="http://evil.example"):
                pass
        async with websockets.connect(f"{ws_url}/ws/monitor/?format=json", origin=live_stack.url) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["kind"] == "connected"

    asyncio.run(scenario())


def test_a_killed_inference_process_is_restarted(live_stack):
    before = children_by_name(live_stack)["inference"]
    os.kill(before.pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = children_by_name(live_stack).get("inference")
        if now and now.pid != before.pid:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("inference process was not restarted")
    health = live_stack.wait_healthy(timeout_s=60)
    assert health["inference"]["pid"] == now.pid


def test_sigterm_stops_every_child(tmp_path):
    from tests.live.conftest import LiveStack

    stack = LiveStack(tmp_path / "var", extra_args=("--skip-demo",))
    stack.wait_healthy()
    children = list(children_by_name(stack).values())
    assert len(children) == 4
    assert stack.stop() == 0
    assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)
