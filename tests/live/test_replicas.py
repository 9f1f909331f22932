"""Two inference processes behind one server: they apply the same state, share the load, and one dying
loses nothing later requests need (issue: N inference processes)."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.live.conftest import LiveStack, load_tiny

CAT = 7  # the test tier's ' cat' feature
SAE = "tiny-llama-layer_2"
STEERING = {"features": [{"index": CAT, "strength": 2.0}], "units": "residual_norm"}
CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16,
        "temperature": 0}


def processes(stack: LiveStack) -> list[dict]:
    return httpx.get(f"{stack.url}/api/health", timeout=10).json()["data"]["processes"]


def steered(record: dict) -> bool:
    return record["loaded_model"] == "tiny-llama" and record["attached_sae"] == SAE and record["steering"] == "active"


def wait_for_processes(stack: LiveStack, count: int, *, timeout_s: float, where=lambda record: True) -> list[dict]:
    """The processes /api/health lists once there are `count` of them, all matching `where` (heartbeats
    refresh every 2 s, so a change shows up within that)."""
    deadline = time.monotonic() + timeout_s
    seen: list[dict] = []
    while time.monotonic() < deadline:
        seen = processes(stack)
        if len(seen) == count and all(where(p) for p in seen):
            return seen
        time.sleep(0.3)
    raise AssertionError(f"expected {count} processes, saw {seen}\n{stack.read_log()[-3000:]}")


def chat(stack: LiveStack) -> str:
    response = httpx.post(f"{stack.url}/v1/chat/completions", json=CHAT, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def steer(stack: LiveStack) -> dict:
    load_tiny(stack)
    attached = httpx.post(f"{stack.url}/api/saes/{SAE}/attach", timeout=300)
    assert attached.status_code == 200, attached.text
    response = httpx.put(f"{stack.url}/api/steering", json=STEERING, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["data"]


@pytest.fixture(scope="module")
def one_process_text(live_stack):
    """The steered greedy answer with the session's one-process stack: the reference."""
    steer(live_stack)
    text = chat(live_stack)
    httpx.delete(f"{live_stack.url}/api/steering", timeout=60)
    return text


def test_two_processes_apply_the_same_state_share_the_load_and_survive_one_dying(tmp_path, one_process_text):
    stack = LiveStack(tmp_path / "var", env={"MILLM_INFERENCE_PROCESSES": "2"})
    try:
        stack.wait_healthy()
        wait_for_processes(stack, 2, timeout_s=60)
        steering = steer(stack)
        assert len(steering["processes"]["applied"]) == 2, steering["processes"]
        first = wait_for_processes(stack, 2, timeout_s=10, where=steered)

        with ThreadPoolExecutor(max_workers=4) as pool:
            texts = list(pool.map(lambda _: chat(stack), range(20)))
        assert set(texts) == {one_process_text}, texts
        # Heartbeats refresh every 2 s: wait for records that count all 20 chats, then see who ran them.
        fresh = wait_for_processes(stack, 2, timeout_s=15, where=lambda _: True)
        deadline = time.monotonic() + 15
        while sum(p["requests_total"] for p in fresh) < 20 and time.monotonic() < deadline:
            time.sleep(0.5)
            fresh = processes(stack)
        served = {p["process_id"]: p["requests_total"] for p in fresh}
        assert sum(served.values()) >= 20, served
        assert all(count > 0 for count in served.values()), f"one process took every request: {served}"

        victim = first[0]
        os.kill(victim["pid"], signal.SIGKILL)
        time.sleep(0.5)  # the kill lands; requests from now on must all succeed
        assert [chat(stack) for _ in range(5)] == [one_process_text] * 5
        # The victim's record expires within 6 s while the survivor keeps serving. (The supervisor's
        # replacement can announce itself before that, so a moment with exactly one record is not certain.)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = processes(stack)
            ids = {p["process_id"] for p in now}
            if victim["process_id"] not in ids:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the killed process stayed listed: {now}")
        survivor = next(p for p in first if p["process_id"] != victim["process_id"])
        assert survivor["process_id"] in ids

        # The supervisor restarts it; the new process restores model, SAE and steering from the database.
        wait_for_processes(stack, 2, timeout_s=120, where=steered)
        with ThreadPoolExecutor(max_workers=4) as pool:
            assert set(pool.map(lambda _: chat(stack), range(8))) == {one_process_text}
    finally:
        stack.stop()
