"""The System page's processes table in Chromium, on a stack with two inference processes: both listed
with their pid, model and SAE, live (a killed one is replaced by its restart without a reload); no
console error or failed request."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tests.live.conftest import LiveStack
from tests.live.test_browser import ARTIFACTS, browser  # noqa: F401 - the module's Chromium fixture
from tests.live.test_workbench_browser import watched_page

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("browser")]


def live_processes(stack: LiveStack, count: int, timeout_s: float = 120) -> list[dict]:
    """The heartbeat records once `count` processes have loaded the test tier's model and SAE."""
    deadline = time.monotonic() + timeout_s
    processes: list[dict] = []
    while time.monotonic() < deadline:
        processes = httpx.get(f"{stack.url}/api/health", timeout=10).json()["data"].get("processes", [])
        if len(processes) == count and all(p.get("attached_sae") for p in processes):
            return processes
        time.sleep(0.5)
    raise AssertionError(f"not {count} ready processes: {processes}")


def table_pids(page) -> set[int]:
    cells = page.locator("#sys-processes tbody tr td:nth-child(2)").all_text_contents()
    return {int(cell.rsplit("/", 1)[1]) for cell in cells}


def test_the_system_page_lists_every_inference_process_live(tmp_path, browser):  # noqa: F811
    stack = LiveStack(tmp_path / "var", env={"MILLM_INFERENCE_PROCESSES": "2"})
    problems: list[str] = []
    try:
        stack.wait_healthy()
        processes = live_processes(stack, 2)
        page = watched_page(browser, problems)
        for _ in range(2):
            page.goto(f"{stack.url}/system/")
            page.wait_for_selector("#sys-processes h2:text-is('Inference processes (2)')", timeout=10_000)
            assert table_pids(page) == {p["pid"] for p in processes}
            rows = page.locator("#sys-processes tbody tr")
            for i in range(2):
                assert "tiny-llama" in rows.nth(i).inner_text() and "tiny-llama-layer_2" in rows.nth(i).inner_text()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "system-processes.png"), full_page=True)

        # One process killed: the supervisor restarts it and the open page shows the new pid, no reload.
        victim = processes[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        page.wait_for_function(
            """([victim, sibling]) => {
                 const pids = [...document.querySelectorAll('#sys-processes tbody tr td:nth-child(2)')]
                   .map(td => Number(td.textContent.split('/').pop()));
                 const saes = [...document.querySelectorAll('#sys-processes tbody tr td:nth-child(4)')]
                   .map(td => td.textContent.trim());
                 return pids.length === 2 && !pids.includes(victim) && pids.includes(sibling)
                   && saes.every(sae => sae === 'tiny-llama-layer_2');  // the restart restored the model and SAE
               }""", arg=[victim, processes[1]["pid"]], timeout=120_000)
        page.screenshot(path=str(ARTIFACTS / "system-processes-restarted.png"), full_page=True)
        page.close()
    finally:
        stack.stop()
    assert problems == []
