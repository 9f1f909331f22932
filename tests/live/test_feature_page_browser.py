"""The feature page and the Monitor's controls in Chromium, on a real stack: compute the top contexts
(the worker's task, with progress), the logit lens, running statistics; Monitor configure, pause and
resume, request separators. Each action twice; any console error or failed request fails the test."""

from __future__ import annotations

import httpx
import pytest

from tests.live.conftest import load_tiny
from tests.live.test_browser import browser  # noqa: F401 - the module's Chromium fixture
from tests.live.test_workbench_browser import SAE, shot, watched_page

pytestmark = pytest.mark.usefixtures("browser")


def chat(stack, text: str) -> None:
    response = httpx.post(f"{stack.url}/v1/chat/completions", timeout=120, json={
        "model": "tiny-llama", "max_tokens": 4, "messages": [{"role": "user", "content": text}]})
    assert response.status_code == 200, response.text


def test_feature_page_contexts_lens_and_statistics(live_stack, browser):  # noqa: F811
    load_tiny(live_stack)
    assert httpx.post(f"{live_stack.url}/api/saes/{SAE}/attach", timeout=300).status_code == 200
    for _ in range(3):  # history is the corpus's first part: give it the cat
        chat(live_stack, "In the morning the cat was quiet and the cat slept.")
    problems: list[str] = []
    page = watched_page(browser, problems)
    for _ in range(2):
        page.goto(f"{live_stack.url}/saes/{SAE}/features/7/")
        page.wait_for_selector("#lens-promoted", timeout=30_000)
        assert page.locator("#lens-promoted tbody tr:first-child code").text_content() == " cat"
        page.wait_for_selector("#feature-live-stats table", timeout=30_000)
        if page.locator("#compute-contexts").count():
            page.click("#compute-contexts")
        page.wait_for_selector("#top-contexts", timeout=240_000)
        peaks = page.locator("#top-contexts .ctx-peak").all_text_contents()
        assert peaks and all(p == " cat" for p in peaks), peaks
        assert page.locator("#activation-histogram .hist-bar").count() == 20
    shot(page, "feature-contexts")
    assert not problems, problems


def test_monitor_controls_pause_resume_and_separators(live_stack, browser):  # noqa: F811
    load_tiny(live_stack)
    assert httpx.post(f"{live_stack.url}/api/saes/{SAE}/attach", timeout=300).status_code == 200
    problems: list[str] = []
    page = watched_page(browser, problems)
    page.goto(f"{live_stack.url}/monitor/")
    page.wait_for_selector("#system-status.status-live", timeout=10_000)
    # The Monitor's own stream (a second WebSocket): frames sent before it connects are not shown.
    page.wait_for_selector("#monitor-connection.status-live", timeout=30_000)
    for top_k in ("5", "8"):
        page.check("#capture-enabled")
        page.fill("#capture-top-k", top_k)
        page.fill("#capture-features", "7, 42")
        page.click("#capture-apply")
        page.wait_for_selector(f"#capture-saved:has-text('top-{top_k}, pinned 7, 42')", timeout=30_000)
    for text in ("the cat", "the moon"):
        chat(live_stack, text)
    page.wait_for_selector("#activation-log .request-sep", timeout=30_000)
    shot(page, "monitor-controls")
    for _ in range(2):
        page.click("#monitor-pause")
        assert page.inner_text("#monitor-pause") == "Resume"
        shown = page.locator("#activation-log .frame").count()
        chat(live_stack, "the river")
        page.wait_for_selector("#monitor-skipped:has-text('not shown')", timeout=30_000)
        assert page.locator("#activation-log .frame").count() == shown
        page.click("#monitor-pause")
        assert page.inner_text("#monitor-pause") == "Pause"
        chat(live_stack, "the gold")
        page.wait_for_function(f"document.querySelectorAll('#activation-log .frame').length > {shown}", timeout=30_000)
    page.fill("#capture-features", "7, cat")  # (top-k is bounded by the input itself)
    page.click("#capture-apply")
    page.wait_for_selector("#action-error:not([hidden])")
    assert "features: feature indices" in page.inner_text("#action-error")
    # "Recent requests" polls every 2 s: the refusal stays until the next action, not until the next poll.
    page.wait_for_timeout(2500)
    assert page.is_visible("#action-error"), "the refusal vanished at the next background poll"
    assert not [p for p in problems if "400" not in p], problems
