"""/ws/system/ and /metrics on a real stack (daphne + inference process), and the System page in Chromium.

Here rather than in tests/monitoring/ so it shares the session's one `live_stack`.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import httpx
import pytest
import websockets


def test_system_status_streams_over_a_real_websocket(live_stack):
    ws_url = live_stack.url.replace("http", "ws")

    async def first_status() -> tuple[dict, float]:
        started = time.monotonic()
        async with websockets.connect(f"{ws_url}/ws/system/?format=json") as ws:
            while True:
                event = json.loads(await asyncio.wait_for(ws.recv(), 5))
                if event["kind"] == "system_status":
                    return event["payload"], time.monotonic() - started

    status, waited = asyncio.run(first_status())
    assert waited < 5
    assert status["inference"]["up"] is True and isinstance(status["inference"]["pid"], int)
    assert status["lights"]["inference"] == "green"
    assert status["memory"]["total_bytes"] > 0 and status["process_rss_bytes"] > 0
    assert {"latency_p50_ms", "latency_p99_ms", "error_rate", "queue_depth", "active_requests",
            "tokens_per_second"} <= set(status)


def test_metrics_are_open_and_see_the_inference_process(live_stack):
    response = httpx.get(f"{live_stack.url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert "millm_inference_up 1" in response.text
    assert "# TYPE millm_request_latency_seconds histogram" in response.text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_system_page_updates_live_in_chromium(live_stack):
    from playwright.sync_api import sync_playwright

    from tests.live.test_browser import ARTIFACTS, CHROMIUM

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{live_stack.url}/system/")
        page.wait_for_selector("#system-live .light", timeout=10_000)  # the first system_status fragment
        first = page.inner_text("#system-asof")
        page.wait_for_function(f"document.querySelector('#system-asof').innerText !== {first!r}",
                               timeout=10_000)  # a later sample replaced it
        assert page.locator("#system-status.status-live").count() == 1
        assert page.locator("#system-live polyline").get_attribute("points")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "system-page.png"), full_page=True)
        assert errors == []
        browser.close()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_a_served_request_shows_in_metrics_and_history_in_chromium(live_stack):
    from playwright.sync_api import sync_playwright

    from tests.live.conftest import load_tiny
    from tests.live.test_browser import ARTIFACTS, CHROMIUM

    load_tiny(live_stack)
    before = _requests_total(live_stack)
    reply = httpx.post(f"{live_stack.url}/v1/chat/completions", timeout=120, json={
        "model": "tiny-llama", "messages": [{"role": "user", "content": "history marker zebra"}], "max_tokens": 4})
    assert reply.status_code == 200, reply.text
    assert _requests_total(live_stack) == before + 1
    exported = httpx.get(f"{live_stack.url}/api/monitoring/history/export", params={"format": "json", "q": "zebra"},
                         timeout=30)  # streamed by daphne from the async iterator
    assert exported.status_code == 200 and "attachment" in exported.headers["content-disposition"]
    assert [r["request_id"] for r in exported.json()] == [reply.headers["x-request-id"]]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{live_stack.url}/history/")
        page.fill("#history-q", "zebra")  # htmx swaps the table body, no reload
        page.wait_for_function("document.querySelectorAll('tr.history-row').length === 1", timeout=10_000)
        page.wait_for_function("location.search.includes('q=zebra')", timeout=5_000)  # hx-push-url: bookmarkable
        page.fill("#history-q", "no such text anywhere")
        page.wait_for_function("document.querySelectorAll('tr.history-row').length === 0", timeout=10_000)
        page.fill("#history-q", "zebra")
        page.wait_for_selector("tr.history-row a")
        page.click("tr.history-row a")
        page.wait_for_selector("h1 code")
        assert "history marker zebra" in page.inner_text("main")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "history-detail.png"), full_page=True)
        assert errors == []
        browser.close()


def _requests_total(stack) -> float:
    text = httpx.get(f"{stack.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("millm_requests_total{") and 'model="tiny-llama"' in line)
