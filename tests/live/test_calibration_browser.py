"""Calibrated strengths end to end, in Chromium (issue 11): POST /api/saes/{name}/calibrate runs in the real
Celery worker of a live stack (its own copy of the test tier, so the shared asset cache is never changed);
then on the Steering page a new slider starts at the feature's recommended strength with a range fitted to
its useful range in the chosen unit, and switching the unit (twice) changes the range and keeps the same raw
strength. Any console error or failed request fails the test."""

from __future__ import annotations

import json
import shutil
import time

import httpx
import pytest

from tests.live.conftest import ASSET_CACHE, LiveStack
from tests.live.test_browser import ARTIFACTS, browser  # noqa: F401 - the module's Chromium fixture

pytestmark = pytest.mark.usefixtures("browser")
SAE, CAT = "tiny-llama-layer_2", 7


@pytest.fixture(scope="module")
def calibrated_stack(tmp_path_factory):
    cache = tmp_path_factory.mktemp("assets")
    shutil.copytree(ASSET_CACHE / "test", cache / "test")
    (cache / "test" / "sae" / "calibration.json").unlink(missing_ok=True)
    stack = LiveStack(tmp_path_factory.mktemp("calibration") / "var", env={"MILLM_ASSET_CACHE": str(cache)})
    try:
        stack.wait_healthy()
        yield stack
    finally:
        stack.stop()


def wait_calibrated(stack: LiveStack, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = httpx.get(f"{stack.url}/api/saes/{SAE}/calibration", timeout=30).json()["data"]
        if status["state"] == "error":
            pytest.fail(f"calibration failed: {status}")
        if status["calibrated"] and status["state"] == "done":
            return status
        time.sleep(1)
    pytest.fail(f"calibration not done in {timeout_s}s: {status}\n{stack.read_log()[-3000:]}")


def slider(page) -> dict:
    return page.eval_on_selector(f"#steer-{CAT} input.strength-range",
                                 "e => ({min: +e.min, max: +e.max, step: +e.step, value: +e.value,"
                                 " number: +e.nextElementSibling.value})")


def test_a_new_slider_starts_at_the_recommended_strength_and_follows_the_unit(calibrated_stack, browser):  # noqa: F811
    stack = calibrated_stack
    queued = httpx.post(f"{stack.url}/api/saes/{SAE}/calibrate", timeout=30)
    assert queued.status_code == 200, queued.text
    assert queued.json()["data"]["state"] in ("queued", "running", "done")
    wait_calibrated(stack)
    row = next(r for r in httpx.get(f"{stack.url}/api/saes/{SAE}/features?q=cat", timeout=30).json()["data"]
               if r["index"] == CAT)
    strengths = row["strengths"]
    assert set(strengths) >= {"raw", "residual_norm"}

    assert httpx.post(f"{stack.url}/api/models/tiny-llama/load", timeout=300).status_code == 200
    assert httpx.post(f"{stack.url}/api/saes/{SAE}/attach", timeout=300).status_code == 200
    problems: list[str] = []
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: problems.append(f"pageerror: {exc}"))
    page.on("response", lambda r: problems.append(f"{r.status}: {r.url}") if r.status >= 400 else None)
    page.goto(f"{stack.url}/steering/")
    units = page.eval_on_selector("#steering-units", "e => e.value")
    page.fill("#feature-query", "cat")
    page.wait_for_selector(f"#feature-{CAT} .steer-button")
    page.click(f"#feature-{CAT} .steer-button")
    page.wait_for_selector(f"#steer-{CAT}")

    def expect(unit: str) -> dict:
        shown = slider(page)
        wanted = strengths[unit]
        top = float(f"{2 * abs(wanted['high']):.2g}")
        assert shown["max"] == pytest.approx(top) and shown["min"] == pytest.approx(-top), (unit, shown, wanted)
        assert wanted["low"] < shown["max"] and shown["step"] == pytest.approx(float(f"{top / 200:.2g}"))
        return shown

    first = expect(units)
    assert first["number"] == pytest.approx(strengths[units]["recommended"], rel=1e-3)
    other = "raw" if units != "raw" else "residual_norm"
    for _ in range(2):  # there and back, twice: each switch refits the range and keeps the raw strength
        for unit in (other, units):
            page.select_option("#steering-units", unit)
            shown = expect(unit)
            assert shown["number"] == pytest.approx(strengths[unit]["recommended"], rel=0.01), (unit, shown)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "calibration-slider.png"), full_page=True)
    assert not problems, json.dumps(problems, indent=1)
