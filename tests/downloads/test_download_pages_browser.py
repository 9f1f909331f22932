"""The download forms in Chromium against the stand-in hub: a model and an SAE reach "completed" live over
/ws/progress/, a slow one is cancelled from its row, an offline download says so — each twice, with no
console error or failed request."""

from __future__ import annotations

import shutil

import pytest

from tests.downloads.conftest import MODEL_REPO, SAE_PATH, SAE_REPO, WIDE_REPO
from tests.live.conftest import LiveStack
from tests.live.test_browser import ARTIFACTS, browser  # noqa: F401 - the module's Chromium
from tests.live.test_workbench_browser import watched_page

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")]


@pytest.fixture(scope="module")
def stack(hub_server, tmp_path_factory):
    live = LiveStack(tmp_path_factory.mktemp("download-pages") / "var", env={"HF_ENDPOINT": hub_server.url})
    live.wait_healthy()
    yield live
    live.stop()


def row_of(page, name: str):
    return page.locator("tr.download", has=page.locator(f"td b:text-is('{name}')"))


def test_download_cancel_and_offline_through_the_pages(stack, hub_server, browser):  # noqa: F811
    problems: list[str] = []
    page = watched_page(browser, problems)
    for attempt in (1, 2):
        hub_server.chunk_delay_s = 0.0
        page.goto(f"{stack.url}/models/")
        page.fill("#model-download-form [name=repo_id]", MODEL_REPO)
        page.fill("#model-download-form [name=name]", f"hub-tiny-{attempt}")
        page.click("#model-download-form button[type=submit]")
        row_of(page, f"hub-tiny-{attempt}").locator(".badge-completed").wait_for(timeout=60_000)
        # The completed row refreshed the model table: the new model is listed, in human units.
        page.locator(f"#model-hub-tiny-{attempt}").wait_for(timeout=10_000)
        assert "236K" in page.locator(f"#model-hub-tiny-{attempt}").inner_text()
        ARTIFACTS.mkdir(exist_ok=True)

        # A slow one, cancelled from its row while it runs.
        hub_server.chunk_delay_s = 0.005
        page.fill("#model-download-form [name=repo_id]", WIDE_REPO)
        page.fill("#model-download-form [name=name]", f"wide-{attempt}")
        page.click("#model-download-form button[type=submit]")
        wide = row_of(page, f"wide-{attempt}")
        wide.locator(".badge-running").wait_for(timeout=60_000)
        page.wait_for_function("(document.querySelector('#downloads-model tr.download-running progress[value]') || {}).value > 1",
                               timeout=30_000)
        wide.locator("button.download-cancel").click()
        wide.locator(".badge-cancelled").wait_for(timeout=30_000)
        assert page.locator(f"#model-wide-{attempt}").count() == 0
        hub_server.chunk_delay_s = 0.0

        # A repo the hub does not have: the row says so (the worker's answer, not a hang).
        page.fill("#model-download-form [name=repo_id]", "millm/no-such-repo")
        page.fill("#model-download-form [name=name]", f"missing-{attempt}")
        page.click("#model-download-form button[type=submit]")
        assert "was not found" in row_of(page, f"missing-{attempt}").locator(".download-error").inner_text(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "models-download.png"), full_page=True)

        # The SAE for the downloaded model, from a hub repo folder.
        page.goto(f"{stack.url}/saes/")
        page.select_option("#sae-download-form [name=model]", f"hub-tiny-{attempt}")
        page.check("#sae-download-form [name=source][value=repo]")
        page.fill("#sae-download-form [name=repo_id]", SAE_REPO)
        page.fill("#sae-download-form [name=path]", SAE_PATH)
        page.click("#sae-download-form button[type=submit]")
        row_of(page, f"hub-tiny-{attempt}-layer_2").locator(".badge-completed").wait_for(timeout=60_000)
        page.locator(f"#sae-hub-tiny-{attempt}-layer_2 a.sae-browse").wait_for(timeout=10_000)

        # A refused form shows its reason in the page.
        page.fill("#sae-download-form [name=path]", "../outside")
        page.click("#sae-download-form button[type=submit]")
        page.locator("#action-error").wait_for(timeout=10_000)
        assert "path" in page.locator("#action-error").inner_text()
        page.screenshot(path=str(ARTIFACTS / "saes-download.png"), full_page=True)
    assert problems == [], problems
    page.close()
