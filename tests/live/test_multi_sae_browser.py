"""Two SAEs attached, through the pages in Chromium (test tier): the SAEs page attaches the second and names the
default; the Steering page steers feature 7 of both SAEs at once (the same index on two SAEs is allowed, the same
(SAE, index) twice refused), compares, applies and saves a profile keeping each feature's SAE; "Steer this" on the
second SAE's feature page adds that SAE's feature; the Monitor shows frames of both SAEs, each naming its SAE, and the
history heatmap shows one SAE's features at a time, the other a click away. Each action twice; any
console error or failed request fails the test; screenshots go to test-artifacts/."""

from __future__ import annotations

import httpx
import pytest

from tests.live.conftest import LiveStack
from tests.live.test_browser import ARTIFACTS, browser  # noqa: F401 - the module's Chromium fixture
from tests.live.test_workbench_browser import watched_page

pytestmark = pytest.mark.usefixtures("browser")
LATE, EARLY = "tiny-llama-layer_2", "tiny-llama-layer_1"  # the demo tier's SAE (the default), the second one
CAT = 7  # ' cat' in both SAEs


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = LiveStack(tmp_path_factory.mktemp("multi-sae-pages") / "var")  # its own: it leaves two SAEs attached
    stack.wait_healthy()
    yield stack
    stack.stop()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"multi-sae-{name}.png"), full_page=True)


def search(page, sae: str, query: str) -> None:
    page.select_option("#feature-sae", label=next(o for o in page.locator("#feature-sae option").all_inner_texts()
                                                   if o.startswith(sae)))
    page.fill("#feature-query", "")
    page.fill("#feature-query", query)
    page.wait_for_function("document.querySelector('#feature-count').textContent.includes('matching')",
                           timeout=10_000)
    page.wait_for_selector(f"tr.feature-row a[href*='/saes/{sae}/features/']", timeout=10_000)


def test_two_saes_through_the_pages(stack, browser):  # noqa: F811
    httpx.delete(f"{stack.url}/api/steering", timeout=30)
    problems: list[str] = []
    page = watched_page(browser, problems)

    # SAEs page: attach the second SAE (attach, detach, attach); the first stays attached and the default.
    page.goto(f"{stack.url}/saes/")
    page.wait_for_selector("#system-status.status-live", timeout=10_000)
    assert page.locator(f"#sae-{LATE} .badge-attached").count() == 1
    for _ in range(2):
        page.click(f"#sae-{EARLY} button:text-is('Attach')")
        page.wait_for_selector(f"#sae-{EARLY} .badge-attached", timeout=60_000)
        if _ == 0:
            page.click(f"#sae-{EARLY} button:text-is('Detach')")
            page.wait_for_selector(f"#sae-{EARLY} button:text-is('Attach')", timeout=30_000)
    page.reload()
    assert page.locator(f"#sae-{LATE} .sae-default").count() == 1
    assert page.locator(f"#sae-{EARLY} .sae-default").count() == 0
    assert page.locator(f"#sae-{EARLY} .badge-attached").count() == 1
    shot(page, "1-saes")
    health = httpx.get(f"{stack.url}/api/health", timeout=10).json()["data"]["inference"]
    assert [s["name"] for s in health["attached_saes"]] == [LATE, EARLY]

    # Steering page: feature 7 of the second SAE, then feature 7 of the default one.
    page.goto(f"{stack.url}/steering/")
    page.wait_for_selector("#attached-saes")
    search(page, EARLY, "cat")
    page.click(f"#feature-{CAT} .steer-button")
    page.wait_for_selector(f"#steer-{EARLY}-{CAT}")
    assert page.locator(f"#steer-{EARLY}-{CAT} .sae-badge").inner_text() == EARLY
    for _ in range(2):  # the same (SAE, index) again is refused
        page.click(f"#feature-{CAT} .steer-button")
        page.wait_for_selector("#action-error:not([hidden])")
        assert "already in the steering panel" in page.inner_text("#action-error")
    search(page, LATE, "cat")
    page.click(f"#feature-{CAT} .steer-button")  # the same index of another SAE is allowed
    page.wait_for_selector(f"#steer-{CAT}")
    assert page.locator("#steering-rows .slider-row").count() == 2
    page.fill(f"#steer-{CAT} input.strength", "6")
    page.fill(f"#steer-{EARLY}-{CAT} input.strength", "40")
    shot(page, "2-panel")

    # Compare twice: the same steered answer, and it is not the unsteered one.
    page.fill("textarea[name=prompt]", "Hello!")
    page.fill("input[name=max_tokens]", "16")
    answers = []
    for _ in range(2):
        page.evaluate("document.getElementById('compare-result').replaceChildren()")
        page.click("#compare-button")
        page.wait_for_selector(".compare", timeout=60_000)
        answers.append((page.inner_text(".compare .steered pre"), page.inner_text(".compare .card:not(.steered) pre")))
    assert answers[0] == answers[1] and answers[0][0] != answers[0][1]
    shot(page, "3-compare")

    # Apply twice: the active steering keeps each feature's SAE.
    for _ in range(2):
        page.click("button:has-text('Apply to every request')")
        page.wait_for_function("document.querySelector('#steering-badge').textContent.includes('2 feature')")
    state = httpx.get(f"{stack.url}/api/steering", timeout=10).json()["data"]
    assert [(f["index"], f.get("sae"), f["strength"]) for f in state["features"]] == [
        (CAT, EARLY, 40.0), (CAT, None, 6.0)]
    steered = httpx.post(f"{stack.url}/v1/chat/completions", timeout=30, json={
        "model": "tiny-llama", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16,
        "temperature": 0}).json()["choices"][0]["message"]["content"]
    assert steered.strip() == answers[0][0].strip()  # the applied steering is the compared one

    # The reloaded page shows both applied sliders, each with its SAE.
    page.reload()
    page.wait_for_selector(f"#steer-{EARLY}-{CAT}")
    assert page.locator(f"#steer-{CAT}").count() == 1

    # Save as profile (twice: the second a clear refusal); the profile keeps each feature's SAE.
    page.click(".save-profile summary")
    page.fill("input[name=profile_name]", "two-saes-ui")
    page.click("#save-profile-button")
    page.wait_for_selector("#save-profile-status.ok-box")
    page.click("#save-profile-button")
    page.wait_for_selector("#action-error:not([hidden])")
    assert "CONFLICT" in page.inner_text("#action-error")
    profile = httpx.get(f"{stack.url}/api/profiles/two-saes-ui", timeout=10).json()["data"]
    assert sorted((f["index"], f.get("sae") or "") for f in profile["features"]) == [(CAT, ""), (CAT, EARLY)]

    # "Steer this" on the second SAE's feature page adds that SAE's feature (twice: still one slider).
    for _ in range(2):
        page.goto(f"{stack.url}/saes/{EARLY}/features/42/")
        page.click("#steer-this")
        page.wait_for_selector(f"#steer-{EARLY}-42")
        assert page.locator(f"#steer-{EARLY}-42 input[name=sae]").get_attribute("value") == EARLY
        assert page.locator(f"#steer-{EARLY}-42").count() == 1 and page.locator("#steer-42").count() == 0
    shot(page, "4-steer-this")

    # Monitor: a chat's live frames name their SAE (frames carry `sae` while several are attached).
    page.goto(f"{stack.url}/monitor/")
    page.wait_for_selector("#system-status.status-live", timeout=10_000)
    page.wait_for_selector("#monitor-connection.status-live", timeout=30_000)  # the Monitor's own stream is connected
    request_id = httpx.post(f"{stack.url}/v1/chat/completions", timeout=30, json={
        "model": "tiny-llama", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8,
        "temperature": 0}).headers["x-request-id"]
    page.wait_for_selector(f".frame[data-request='{request_id}'] .frame-sae", timeout=5_000)
    for name in (LATE, EARLY):  # every attached SAE's frames, each with its badge
        page.wait_for_selector(f".frame[data-request='{request_id}'][data-sae='{name}']", timeout=5_000)
        badges = page.locator(f".frame[data-request='{request_id}'][data-sae='{name}'] .frame-sae").all_inner_texts()
        assert badges and set(badges) == {name}
    shot(page, "5-monitor")

    # History: the heatmap says whose features its columns are.
    for _ in range(50):  # recorded once the request ends
        if httpx.get(f"{stack.url}/api/monitoring/history/{request_id}", timeout=10).status_code == 200:
            break
        page.wait_for_timeout(200)
    for _ in range(2):
        page.goto(f"{stack.url}/history/{request_id}/")
        page.wait_for_selector("table.token-features", timeout=15_000)
        assert LATE in page.inner_text("#heatmap-sae")
        rows = page.locator("table.token-features tbody tr").count()
        # The other SAE's features: one click; the table keeps one row per token, and the options keep the SAE.
        page.click(f"#heatmap-sae-choice a[data-sae='{EARLY}']")
        page.wait_for_selector(f"#heatmap-sae-choice a.active[data-sae='{EARLY}']", timeout=15_000)
        assert EARLY in page.inner_text("#heatmap-sae") and LATE not in page.inner_text("#heatmap-sae")
        assert page.locator("table.token-features tbody tr").count() == rows
        page.click("text=scale each column")
        page.wait_for_selector("text=one colour scale", timeout=15_000)
        assert EARLY in page.inner_text("#heatmap-sae") and "sae=" + EARLY in page.url
    shot(page, "6-history")
    page.wait_for_timeout(2300)  # past one system_status tick
    page.close()
    assert problems == []
