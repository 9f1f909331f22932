"""The compare's token strip and the Sweep control in Chromium on the live stack (test tier), each done twice:
a feature page's "Sweep its strength" runs a sweep on load (a background job on the Celery worker, polled),
the panel's Sweep runs inline. Any console error or failed request fails the test; screenshots go to
test-artifacts/."""

from __future__ import annotations

import httpx
import pytest

from tests.live.conftest import load_tiny
from tests.live.test_browser import ARTIFACTS, browser  # noqa: F401 - the module's Chromium fixture
from tests.live.test_workbench_browser import shot, watched_page

pytestmark = pytest.mark.usefixtures("browser")
SAE = "tiny-llama-layer_2"


def mark_old(page, selector: str) -> None:
    page.evaluate(f"document.querySelector({selector!r})?.setAttribute('data-old', '1')")


def test_sweep_from_a_feature_page_then_compare_and_sweep_twice(live_stack, browser):  # noqa: F811
    load_tiny(live_stack)
    assert httpx.post(f"{live_stack.url}/api/saes/{SAE}/attach", timeout=300).status_code == 200
    httpx.delete(f"{live_stack.url}/api/steering", timeout=30)
    problems: list[str] = []
    page = watched_page(browser, problems)

    # Feature page → "Sweep its strength": the Steering page opens with the slider and sweeps on load; the
    # three neutral prompts make it a job the fragment polls until the worker is done.
    page.goto(f"{live_stack.url}/saes/{SAE}/features/7/")
    page.wait_for_load_state("networkidle")  # leaving earlier aborts the page's own fetches (favicon)
    page.click("#sweep-this")
    page.wait_for_selector("#steer-7")
    page.wait_for_selector("#sweep-result[data-status=done]", timeout=180_000)
    assert page.locator("#sweep-chart polyline.sweep-concept").count() == 1
    assert page.locator(".sweep-points tbody tr").count() == 6  # 0 and the auto grid's five strengths
    shot(page, "sweep-1-job")

    # Compare twice: the token strip marks where the answers part, with the changed features listed.
    page.fill("textarea[name=prompt]", "Hello!")
    page.fill("input[name=max_tokens]", "12")
    for strength in ("80", "40"):
        page.fill("#steer-7 input.strength", strength)
        mark_old(page, ".compare")
        page.click("#compare-button")
        page.wait_for_selector(f".compare[data-steered-with^='#7={float(strength)}']:not([data-old])", timeout=60_000)
        assert page.locator("#token-diff .tok").count() == 12
        assert page.locator("#token-diff .tok.diverges").count() == 1
        assert page.locator("#token-diff .tok").first.get_attribute("title").count("log-prob") == 2
        assert page.locator("#token-diff table.top-changed tbody tr").count() >= 1
    shot(page, "sweep-2-compare")

    # Sweep twice with the test prompt: 6 generations, answered inline, the recommended point marked.
    for _ in range(2):
        mark_old(page, "#sweep-result")
        page.click("#sweep-button")
        page.wait_for_selector("#sweep-result[data-status=done]:not([data-old])", timeout=120_000)
        assert page.locator(".sweep-points tbody tr").count() == 6
        assert page.locator(".sweep-output").count() == 6
        recommended = page.inner_text("#sweep-recommended")
        assert recommended == "none" or page.locator("#sweep-marker").count() == 1
    shot(page, "sweep-3-inline")
    page.locator("#sweep-result").screenshot(path=str(ARTIFACTS / "workbench-sweep-4-chart.png"))
    assert not problems, problems
