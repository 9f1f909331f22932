"""The pages in real Chromium: htmx and its ws extension load from static/ and work."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent.parent / "test-artifacts"

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


def test_feature_search_and_live_status_in_chromium(live_stack, browser):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{live_stack.url}/steering/")
    # The ws extension connected to /ws/system/ and swapped the status dot out of band.
    page.wait_for_selector("#system-status.status-live", timeout=10_000)
    rows_before = page.locator("tr.feature-row").count()
    assert rows_before > 1
    page.fill("#feature-query", "7")
    page.wait_for_function("document.querySelectorAll('tr.feature-row').length === 1", timeout=10_000)
    assert page.locator("tr.feature-row td").first.inner_text() == "7"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "steering-search.png"), full_page=True)
    assert errors == []
    page.close()


def test_attach_and_compare_steering_in_chromium(live_stack, browser):
    from tests.live.conftest import load_tiny

    load_tiny(live_stack)
    page = browser.new_page()
    page.goto(f"{live_stack.url}/saes/")
    page.click("#sae-tiny-llama-layer_2 button:has-text('Attach')")
    page.wait_for_selector("#sae-tiny-llama-layer_2 .badge-attached", timeout=60_000)
    page.goto(f"{live_stack.url}/steering/")
    page.fill("#feature-query", "cat")
    page.wait_for_function("document.querySelectorAll('tr.feature-row').length === 1", timeout=10_000)
    page.click("tr.feature-row button:has-text('Steer')")
    page.wait_for_selector("#steer-7")
    page.fill("#steer-7 input.strength", "80")
    page.fill("textarea[name=prompt]", "Hello!")
    page.click("button:has-text('Compare')")
    page.wait_for_selector(".compare .steered pre", timeout=60_000)
    steered = page.inner_text(".compare .steered pre")
    unsteered = page.inner_text(".compare .card:not(.steered) pre")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "steering-compare.png"), full_page=True)
    assert "cat" in steered and "cat" not in unsteered
    page.close()


def test_monitor_page_shows_a_requests_tokens_and_features_within_2s(live_stack, browser):
    import time

    import httpx
    import openai

    from tests.live.conftest import load_tiny

    load_tiny(live_stack)
    assert httpx.post(f"{live_stack.url}/api/saes/tiny-llama-layer_2/attach", timeout=300).status_code == 200
    page = browser.new_page()
    page.goto(f"{live_stack.url}/monitor/")
    page.wait_for_selector("#system-status.status-live, #system-status[class*='status-']", timeout=10_000)
    page.wait_for_selector("#monitor-connection.status-live", timeout=30_000)  # the Monitor's own stream is connected
    client = openai.OpenAI(base_url=f"{live_stack.url}/v1", api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-llama", messages=[{"role": "user", "content": "The cat sat by the river"}], max_tokens=8,
        temperature=0)
    request_id = raw.headers["x-request-id"]
    answered = time.monotonic()
    page.wait_for_selector(f".frame[data-request='{request_id}']", timeout=2_000)
    frame_count = page.locator(f".frame[data-request='{request_id}']").count()
    assert time.monotonic() - answered < 2.0
    assert frame_count >= 8
    cat_row = page.locator(f".frame[data-request='{request_id}']:has(code.frame-token:text-is(' cat'))").first
    assert "#7" in cat_row.inner_text() and "cat" in cat_row.inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "monitor-live.png"), full_page=True)
    page.close()
