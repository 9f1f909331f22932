"""The researcher's whole loop through the pages in Chromium on the DEMO tier (SmolLM2-135M + its SAE):
search "Paris" → the Paris feature first → its feature page → steer it at the recommended strength →
compare twice → save as profile → activate it from Profiles → a steered chat through the openai client →
the Monitor page live → the history detail's heatmap. Also "top features for this text" and the
recommended-steering checkbox. Any console error or failed request fails a test; every page is
screenshotted to test-artifacts/demo-*.png."""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest

from tests.conftest import ASSET_CACHE
from tests.live.conftest import LiveStack
from tests.live.test_browser import ARTIFACTS, browser  # noqa: F401 - the module's Chromium fixture
from tests.live.test_workbench_browser import watched_page

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800), pytest.mark.usefixtures("browser")]
PARIS = 1866  # the demo SAE's "' French', ' Paris', ' France'" feature
PROMPT = "Tell me about your weekend."
CONCEPT = re.compile(r"Paris|France|French", re.IGNORECASE)


@pytest.fixture(scope="module")
def demo_stack(tmp_path_factory):
    """A stack serving the demo tier (built once into the asset cache; minutes the first time)."""
    stack = LiveStack(tmp_path_factory.mktemp("demo-stack") / "var",
                      # a busy 2-core machine can take more than the default 5 s for a management call
                      env={"MILLM_DEMO_TIER": "demo", "MILLM_TORCH_THREADS": "2", "MILLM_INFERENCE_TIMEOUT": "30"})
    try:
        stack.wait_healthy(timeout_s=1500)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # the inference process restores the demo model and SAE
            inference = httpx.get(f"{stack.url}/api/health", timeout=10).json()["data"]["inference"]
            if inference.get("attached_sae"):
                break
            time.sleep(0.5)
        stack.sae = inference["attached_sae"]
        stack.model = inference["loaded_model"]
        assert stack.sae, inference
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def recipe() -> dict:
    """The demo SAE's measured steering preset (direction, layers, units, recommended strength)."""
    return json.loads((ASSET_CACHE / "demo" / "sae" / "steering.json").read_text())


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"demo-{name}.png"), full_page=True)


def search(page, query: str) -> None:
    page.fill("#feature-query", "")
    page.wait_for_function("!document.querySelector('#feature-count').textContent.includes('matching')",
                           timeout=10_000)
    page.fill("#feature-query", query)
    page.wait_for_function(f"document.querySelector('#feature-count').textContent.includes('matching “{query}”')",
                           timeout=10_000)


def test_demo_loop_search_steer_compare_save_activate_chat_monitor_history(demo_stack, browser, recipe):  # noqa: F811
    stack = demo_stack
    httpx.delete(f"{stack.url}/api/steering", timeout=30)
    problems: list[str] = []
    page = watched_page(browser, problems)

    # Find: "Paris" ranks the Paris feature first (a label-word match), twice.
    page.goto(f"{stack.url}/steering/")
    page.wait_for_selector("#system-status.status-live", timeout=10_000)
    for _ in range(2):
        search(page, "Paris")
        assert page.locator("tr.feature-row").first.get_attribute("id") == f"feature-{PARIS}"
    assert page.locator(f"#feature-{PARIS} .feature-label mark").first.inner_text() == "Paris"
    shot(page, "1-search")

    # Its feature page, with the logit lens read from the loaded model.
    page.click(f"#feature-{PARIS} td:first-child a")
    page.wait_for_url(f"**/saes/{stack.sae}/features/{PARIS}/")
    page.wait_for_selector("#lens-promoted", timeout=30_000)
    page.wait_for_selector("#feature-live-stats", timeout=30_000)
    assert "No tokens seen" in page.inner_text("#feature-live-stats")  # a fresh stack: no empty table of zeros
    assert "Paris" in page.inner_text("#feature-headline")
    # Its recommended strength: calibrated for this feature where the SAE has a calibration, else the SAE's preset.
    shown = re.search(r"([\d.]+) × residual norm", page.inner_text("#feature-recommended"))
    assert shown, page.inner_text("#feature-recommended")
    recommended = float(shown.group(1))
    assert 0 < recommended <= recipe["strength_range"][1] * 3  # near the SAE's useful range
    # (Its top contexts are computed by the worker over 40,000 tokens: minutes on a busy 2-core machine, so
    # tests/live/test_feature_page_browser.py covers them on the test tier and tests/test_page_speed_demo.py here.)
    shot(page, "2-feature")

    # "Steer this": a slider at the recommended strength, in the recommended units, the preset ticked.
    page.click("#steer-this")
    page.wait_for_selector(f"#steer-{PARIS}")
    assert float(page.input_value(f"#steer-{PARIS} input.strength")) == pytest.approx(recommended)
    assert page.input_value("#steering-units") == recipe["units"]
    assert page.is_checked("#steering-preset input[name=preset]")

    # Compare twice with different strengths: two different steered answers, each unlike the unsteered one.
    page.fill("textarea[name=prompt]", PROMPT)
    page.fill("input[name=max_tokens]", "24")
    steered, unsteered = [], set()
    low, high = recommended, round(recommended * 1.5, 4)
    for strength in (low, high):
        page.fill(f"#steer-{PARIS} input.strength", str(strength))
        page.click("#compare-button")
        page.wait_for_selector(f".compare[data-steered-with^='#{PARIS}={float(strength)} ']", timeout=180_000)
        steered.append(page.inner_text(".compare .steered pre"))
        unsteered.add(page.inner_text(".compare .card:not(.steered) pre"))
        # The token-level diff: the steered answer token by token, where it parts marked, what changed most.
        assert page.locator("#token-diff .token-strip .tok").count() >= 10
        assert page.locator("#token-diff .token-strip .tok.diverges").count() == 1
        assert page.evaluate("(s => s.scrollWidth <= s.clientWidth)(document.querySelector('#token-diff .token-strip'))")
        changed = page.locator("#token-diff table.top-changed tbody td:first-child").all_text_contents()
        # Ranked by the mean change over the answer: with the preset's stop-once-written steering the Paris
        # feature itself fires on a token or two only, so it need not rank here; the list must be there.
        assert len(changed) >= 5 and all(index.isdigit() for index in changed), changed
        page.locator("#token-diff").scroll_into_view_if_needed()  # the sticky panel scrolls on its own
        shot(page, f"3-compare-{strength}")
    assert len(unsteered) == 1 and steered[0] != steered[1], (steered, unsteered)
    assert all(text not in unsteered for text in steered), (steered, unsteered)
    assert any(CONCEPT.search(text) for text in steered), steered
    assert page.locator(".compare").count() == 1

    # Save as profile at the recommended strength.
    page.fill(f"#steer-{PARIS} input.strength", str(low))
    page.click(".save-profile summary")
    page.fill("input[name=profile_name]", "paris-demo")
    page.fill("input[name=profile_description]", "the demo SAE's Paris feature")
    page.click("#save-profile-button")
    page.wait_for_selector("#save-profile-status.ok-box")
    shot(page, "4-saved")

    # The unsteered answer, before the profile is active.
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0, timeout=300)
    chat = {"model": stack.model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24,
            "temperature": 0}
    plain = client.chat.completions.create(**chat).choices[0].message.content

    # Profiles: activate, deactivate, activate again (the nav badge follows).
    page.goto(f"{stack.url}/profiles/")
    for _ in range(2):
        page.click("#profile-paris-demo button:text-is('Activate')")
        page.wait_for_selector("#profile-paris-demo .badge-loaded", timeout=30_000)
        assert "profile paris-demo" in page.inner_text("#steering-badge")
        page.click("#profile-paris-demo button:text-is('Deactivate')")
        page.wait_for_selector("#profile-paris-demo button:text-is('Activate')", timeout=30_000)
    page.click("#profile-paris-demo button:text-is('Activate')")
    page.wait_for_selector("#profile-paris-demo .badge-loaded", timeout=30_000)
    shot(page, "5-profiles")

    # A chat through the openai client is steered, and the Monitor page shows it live.
    page.goto(f"{stack.url}/monitor/")
    page.wait_for_selector("#system-status.status-live", timeout=10_000)
    page.wait_for_selector("#monitor-connection.status-live", timeout=30_000)  # the Monitor's own stream is connected
    raw = client.chat.completions.with_raw_response.create(**chat)
    assert raw.headers["x-millm-steering"] == "profile:paris-demo"
    answer = raw.parse().choices[0].message.content
    assert answer != plain, (answer, plain)
    assert answer == steered[0], (answer, steered[0])  # the profile steers as the compare did
    request_id = raw.headers["x-request-id"]
    page.wait_for_selector(f".frame[data-request='{request_id}']", timeout=5_000)
    # "Recent requests" updates live: the steered chat appears, with its profile, linked to its detail.
    row = page.locator(f"#recent-requests tr:has(a[href='/history/{request_id}/'])")
    row.wait_for(timeout=10_000)
    assert "paris-demo" in row.inner_text()
    shot(page, "6-monitor")

    # History detail: generated tokens as rows, every column labelled (label under the index, and on hover).
    page.goto(f"{stack.url}/history/{request_id}/")
    page.wait_for_selector("table.token-features")
    assert page.locator("table.token-features tr.token-generated").count() >= 10
    headers = page.locator("table.token-features th.feature-col")
    assert headers.count() >= 5
    for i in range(headers.count()):
        assert headers.nth(i).locator(".col-label").inner_text().strip(), headers.nth(i).inner_html()
        assert re.match(r"#\d+ \S", headers.nth(i).get_attribute("title"))
    assert page.inner_text("#user-prompt") == PROMPT
    assert "paris-demo" in page.inner_text("table.meta")  # the active profile that steered it is recorded
    # The answer's features come first: the first column has a value on generated tokens.
    first_column = page.locator("table.token-features tr.token-generated td:nth-child(4)").all_text_contents()
    assert any(v.strip() for v in first_column), first_column
    shot(page, "7-history")

    httpx.delete(f"{stack.url}/api/steering", timeout=30)
    page.close()
    assert problems == []


def test_demo_top_features_for_a_text(demo_stack, browser):  # noqa: F811
    problems: list[str] = []
    page = watched_page(browser, problems)
    page.goto(f"{demo_stack.url}/steering/")
    page.wait_for_selector("#system-status.status-live", timeout=10_000)
    page.click("#text-features-box summary")
    expected = {"I took the train to Paris, the capital of France.": r"Paris",
                "The ocean waves crashed on the beach.": r"ocean"}
    for _ in range(2):
        for text, word in expected.items():
            page.fill("#text-features-text", text)
            page.click("#text-features-button")
            page.wait_for_function(
                "(t) => document.querySelector('#text-features').dataset.text === t", arg=text, timeout=30_000)
            rows = page.locator("#text-features-table tr.text-feature-row")
            assert rows.count() == 20
            top_labels = [rows.nth(i).locator(".feature-label").inner_text() for i in range(5)]
            assert any(re.search(word, label) for label in top_labels), (text, top_labels)
            link = rows.first.locator("td:first-child a")
            assert link.get_attribute("href").startswith(f"/saes/{demo_stack.sae}/features/")
    shot(page, "8-text-features")
    rows.first.locator(".steer-button").click()  # "Steer" on a result adds its slider to the panel
    page.wait_for_selector(f"#steering-rows #steer-{rows.first.get_attribute('id').removeprefix('text-feature-')}")
    index = rows.first.get_attribute("id").removeprefix("text-feature-")
    rows.first.locator("td:first-child a").click()  # each row links to its feature page
    page.wait_for_url(f"**/saes/{demo_stack.sae}/features/{index}/")
    page.close()
    assert problems == []


def test_demo_recommended_steering_checkbox(demo_stack, browser, recipe):  # noqa: F811
    """The "recommended steering" checkbox: ticked, compare and Apply use the SAE's measured preset (its concept
    direction at its layers); unticked, the plain decoder direction at the SAE's layer. Twice each way."""
    stack = demo_stack
    httpx.delete(f"{stack.url}/api/steering", timeout=30)
    problems: list[str] = []
    page = watched_page(browser, problems)
    preset = "#steering-preset input[name=preset]"
    page.goto(f"{stack.url}/steering/?steer={PARIS}")
    page.wait_for_selector("#system-status.status-live", timeout=10_000)
    assert page.is_checked(preset)  # nothing applied yet: the recommended steering is offered ticked
    page.fill("textarea[name=prompt]", PROMPT)
    page.fill("input[name=max_tokens]", "16")
    answers = {}
    for ticked in (True, False):
        page.set_checked(preset, ticked)
        page.evaluate("document.querySelector('#compare-result').replaceChildren()")  # wait for the new one
        page.click("#compare-button")
        page.wait_for_selector(".compare .steered pre", timeout=180_000)
        answers[ticked] = page.inner_text(".compare .steered pre")
    assert answers[True] != answers[False], answers  # the preset really changes how the feature steers

    for _ in range(2):
        for ticked, direction in ((True, "concept"), (False, "decoder")):
            page.goto(f"{stack.url}/steering/?steer={PARIS}")
            page.set_checked(preset, ticked)
            page.click("button:has-text('Apply to every request')")
            page.wait_for_selector("#steering-status.ok-box", timeout=30_000)
            applied = httpx.get(f"{stack.url}/api/steering", timeout=30).json()["data"]
            assert applied["direction"] == direction and [f["index"] for f in applied["features"]] == [PARIS]
            if ticked:
                assert applied["layers"] == recipe["layers"] and applied["positions"] == recipe["positions"]
            page.goto(f"{stack.url}/steering/")
            assert page.is_checked(preset) == ticked  # the page shows what is applied
            httpx.delete(f"{stack.url}/api/steering", timeout=30)
    shot(page, "9-preset")
    page.close()
    assert problems == []


def test_demo_every_page_free_of_console_errors(demo_stack, browser):  # noqa: F811
    problems: list[str] = []
    page = watched_page(browser, problems)
    for path in ("/", "/models/", "/saes/", "/steering/", "/profiles/", "/monitor/", "/history/", "/system/",
                 f"/saes/{demo_stack.sae}/features/{PARIS}/"):
        page.goto(f"{demo_stack.url}{path}")
        page.wait_for_selector("#system-status.status-live", timeout=10_000)
        page.wait_for_timeout(2300)  # past one system_status tick and one Recent requests poll
        shot(page, "page" + path.replace("/", "_"))
    page.close()
    assert problems == []
