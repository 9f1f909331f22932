"""The researcher's loop through the pages in Chromium: find → feature page → steer → compare twice →
save as profile → activate → a steered chat → Monitor live → history detail. Any console error or
failed request fails the test; screenshots go to test-artifacts/."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.live.conftest import load_tiny
from tests.live.test_browser import ARTIFACTS, browser  # noqa: F401 - the module's Chromium fixture

pytestmark = pytest.mark.usefixtures("browser")
SAE = "tiny-llama-layer_2"


def watched_page(browser, problems: list[str]):  # noqa: F811
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: problems.append(f"pageerror: {exc}"))
    # A poll cut short by leaving the page (net::ERR_ABORTED) is not a failure; errors answered are caught below.
    page.on("requestfailed", lambda req: problems.append(f"failed: {req.url} {req.failure}")
            if req.failure != "net::ERR_ABORTED" else None)
    page.on("response", lambda r: problems.append(f"{r.status}: {r.url}") if r.status >= 400 else None)
    return page


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"workbench-{name}.png"), full_page=True)


def test_find_steer_compare_save_activate_chat_monitor_history(live_stack, browser):  # noqa: F811
    load_tiny(live_stack)
    assert httpx.post(f"{live_stack.url}/api/saes/{SAE}/attach", timeout=300).status_code == 200
    httpx.delete(f"{live_stack.url}/api/steering", timeout=30)
    problems: list[str] = []
    page = watched_page(browser, problems)

    # Find: the cat feature ranks first, with a count and the match highlighted.
    page.goto(f"{live_stack.url}/steering/")
    page.wait_for_selector("#system-status.status-live", timeout=10_000)
    for _ in range(2):
        page.fill("#feature-query", "")
        page.wait_for_function("!document.querySelector('#feature-count').textContent.includes('matching')", timeout=10_000)
        page.fill("#feature-query", "cat")
        page.wait_for_function("document.querySelector('#feature-count').textContent.includes('matching')", timeout=10_000)
    assert page.locator("tr.feature-row").first.get_attribute("id") == "feature-7"
    assert page.locator("tr.feature-row mark").first.inner_text().lower() == "cat"
    shot(page, "1-search")

    # Feature page → "Steer this" puts a slider in the panel, not yet applied.
    page.click("#feature-7 td:first-child a")
    page.wait_for_url(f"**/saes/{SAE}/features/7/")
    shot(page, "2-feature")
    assert page.locator("#similar-features").count() == 1, (page.url, problems, page.content()[:3000])
    assert page.locator("#similar-features tbody tr").count() == 10
    shot(page, "2-feature")
    page.click("#steer-this")
    page.wait_for_selector("#steer-7")
    assert page.is_visible("#steering-dirty")

    # The same feature again is refused (twice), the panel keeps one slider.
    page.fill("#feature-query", "cat")
    page.wait_for_function("document.querySelector('#feature-count').textContent.includes('matching')", timeout=10_000)
    for _ in range(2):
        page.click("#feature-7 .steer-button")
        page.wait_for_selector("#action-error:not([hidden])")
        assert "already in the steering panel" in page.inner_text("#action-error")
    assert page.locator("#steering-rows .slider-row").count() == 1

    # Compare twice with different strengths: two different answers, each labelled with its strength.
    page.fill("textarea[name=prompt]", "Hello!")
    answers = []
    for strength in ("80", "-80"):
        page.fill("#steer-7 input.strength", strength)
        page.click("#compare-button")
        page.wait_for_selector(f".compare[data-steered-with^='#7={float(strength)}']", timeout=60_000)
        answers.append(page.inner_text(".compare .steered pre"))
    assert "cat" in answers[0] and answers[0] != answers[1]
    assert page.locator(".compare").count() == 1
    shot(page, "3-compare")

    # Clear all empties the panel; a second clear on an empty panel is harmless.
    page.click("#steering-clear")
    page.click("#steering-clear")
    assert page.locator("#steering-rows .slider-row").count() == 0 and page.is_visible("#steering-empty")

    # Save as profile (units kept by converting to raw strengths).
    page.goto(f"{live_stack.url}/steering/?steer=7")
    page.fill("#steer-7 input.strength", "80")
    page.click(".save-profile summary")
    page.fill("input[name=profile_name]", "cats-ui")
    page.click("#save-profile-button")
    page.wait_for_selector("#save-profile-status.ok-box")
    page.click("#save-profile-button")  # the same name again is a clear refusal
    page.wait_for_selector("#action-error:not([hidden])")
    assert "CONFLICT" in page.inner_text("#action-error")

    # Profiles: activate (the nav badge says so), deactivate, activate again.
    page.goto(f"{live_stack.url}/profiles/")
    for _ in range(2):
        page.click("#profile-cats-ui button:text-is('Activate')")
        page.wait_for_selector("#profile-cats-ui .badge-loaded")
        assert "profile cats-ui" in page.inner_text("#steering-badge")
        page.click("#profile-cats-ui button:text-is('Deactivate')")
        page.wait_for_selector("#profile-cats-ui button:text-is('Activate')")
        assert page.inner_text("#steering-badge") == "unsteered"
    page.click("#profile-cats-ui button:text-is('Activate')")
    page.wait_for_selector("#profile-cats-ui .badge-loaded")
    shot(page, "4-profiles")

    # A chat through the openai client is steered, and the Monitor page shows it live.
    page.goto(f"{live_stack.url}/monitor/")
    page.wait_for_selector("#system-status.status-live", timeout=10_000)
    page.wait_for_selector("#monitor-connection.status-live", timeout=30_000)  # the Monitor's own stream is connected
    client = openai.OpenAI(base_url=f"{live_stack.url}/v1", api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-llama", messages=[{"role": "user", "content": "Hello!"}], max_tokens=12, temperature=0)
    assert raw.headers["x-millm-steering"] == "profile:cats-ui"
    assert "cat" in raw.parse().choices[0].message.content
    request_id = raw.headers["x-request-id"]
    page.wait_for_selector(f".frame[data-request='{request_id}']", timeout=3_000)
    shot(page, "5-monitor")

    # History detail: the generated tokens are rows of the feature table.
    page.goto(f"{live_stack.url}/history/{request_id}/")
    page.wait_for_selector("table.token-features")
    assert page.locator("table.token-features tr.token-generated").count() >= 1
    shot(page, "6-history")

    # Changing the steering on the Steering page ends the profile's "active".
    page.goto(f"{live_stack.url}/steering/")
    page.fill("#steer-7 input.strength", "10")
    page.click("button:has-text('Apply to every request')")
    page.wait_for_function("!document.querySelector('#steering-status').textContent.includes('profile')")
    assert "steering 1 feature" in page.inner_text("#steering-badge")
    page.goto(f"{live_stack.url}/profiles/")
    assert page.locator("#profile-cats-ui .badge-loaded").count() == 0
    time.sleep(2.5)  # one system_status tick on a page without the System panel: no console error
    httpx.delete(f"{live_stack.url}/api/steering", timeout=30)
    page.close()
    assert problems == []


def test_every_page_free_of_console_errors_and_docs_render_offline(live_stack, browser):  # noqa: F811
    problems: list[str] = []
    page = watched_page(browser, problems)
    for path in ("/", "/models/", "/saes/", "/steering/", "/profiles/", "/monitor/", "/history/", "/system/",
                 f"/saes/{SAE}/features/7/"):
        page.goto(f"{live_stack.url}{path}")
        page.wait_for_selector("#system-status.status-live", timeout=10_000)
        page.wait_for_timeout(2300)  # past one system_status tick
        shot(page, "page" + path.replace("/", "_"))
    page.goto(f"{live_stack.url}/api/docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=15_000)
    shot(page, "api-docs")
    page.goto(f"{live_stack.url}/favicon.ico")
    page.close()
    assert problems == []
