"""A real stack with MILLM_API_KEY: Chromium logs in and the pages' htmx calls and WebSocket work;
programs use the key by header; a foreign Origin and a missing key are refused on every surface."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import pytest
import websockets
import websockets.exceptions

from tests.live.conftest import LiveStack
from tests.live.test_browser import ARTIFACTS, browser  # noqa: F401 - shared fixture

KEY = "live-test-key-0123456789"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")]


@pytest.fixture(scope="module")
def keyed_stack(tmp_path_factory):
    stack = LiveStack(tmp_path_factory.mktemp("keyed") / "var", env={"MILLM_API_KEY": KEY})
    stack.wait_healthy()  # /api/health stays open
    yield stack
    stack.stop()


def test_programs_need_the_key_and_a_foreign_origin_is_refused(keyed_stack):
    url = keyed_stack.url
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{url}/history/export?format=csv", follow_redirects=False).status_code == 302
    refused = httpx.post(f"{url}/api/steering/compare", content='{"prompt": "hi"}',
                         headers={"Content-Type": "text/plain", "X-API-Key": KEY})
    assert refused.status_code == 415
    foreign = httpx.get(f"{url}/api/models", headers={"Origin": "http://evil.example", "X-API-Key": KEY})
    assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "FORBIDDEN_ORIGIN"

    async def sockets():
        ws_url = url.replace("http", "ws")
        with pytest.raises(websockets.exceptions.InvalidStatus):
            async with websockets.connect(f"{ws_url}/ws/progress/"):
                pass
        with pytest.raises(websockets.exceptions.InvalidStatus):
            async with websockets.connect(f"{ws_url}/ws/progress/", origin="http://evil.example",
                                          additional_headers={"X-API-Key": KEY}):
                pass
        async with websockets.connect(f"{ws_url}/ws/progress/?format=json",
                                      additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["kind"] == "connected"

    asyncio.run(sockets())


def test_chromium_logs_in_and_the_pages_work(keyed_stack, browser):  # noqa: F811
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{keyed_stack.url}/system/")
    assert "/login/" in page.url
    page.fill("input[name=key]", "wrong")
    page.click("button[type=submit]")
    page.wait_for_selector(".error-box")
    page.fill("input[name=key]", KEY)
    page.click("button[type=submit]")
    page.wait_for_url(f"{keyed_stack.url}/system/")
    # The session carries the key to the WebSocket: the status dot goes live.
    page.wait_for_selector("#system-status.status-live", timeout=15_000)
    with page.expect_response(lambda r: r.url.endswith("/api/health")) as health:
        page.goto(f"{keyed_stack.url}/")  # the overview's hx-get="/api/health"
    assert health.value.status == 200
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "keyed-overview.png"), full_page=True)
    page.click("text=Log out")
    page.wait_for_url(f"{keyed_stack.url}/login/")
    assert errors == []
    page.close()
