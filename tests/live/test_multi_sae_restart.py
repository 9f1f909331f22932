"""Two SAEs attached with steering on both survive a kill -9 of the inference process: the restarted process
attaches both again in the same order (the default stays the default) and the steered text is the same."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tests.live.conftest import LiveStack
from tests.live.test_faults import children, greedy, wait_for_steered_text

CAT = 7  # ' cat' in both test-tier SAEs (engine/assets/tiny.py)
LATE, EARLY = "tiny-llama-layer_2", "tiny-llama-layer_1"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = LiveStack(tmp_path_factory.mktemp("multi-sae-restart") / "var")
    stack.wait_healthy()
    yield stack
    stack.stop()


def attached(stack: LiveStack) -> list[str]:
    inference = httpx.get(f"{stack.url}/api/health", timeout=10).json()["data"]["inference"]
    return [s["name"] for s in inference.get("attached_saes") or []]


def test_a_restarted_inference_process_attaches_every_sae_in_order_and_steers_both(stack):
    response = httpx.post(f"{stack.url}/api/saes/{EARLY}/attach", timeout=120)
    assert response.status_code == 200, response.text
    assert attached(stack) == [LATE, EARLY]  # the demo tier's SAE first: the default
    plain = greedy(stack).json()["choices"][0]["message"]["content"]
    features = [{"index": CAT, "strength": 6.0}, {"sae": EARLY, "index": 42, "strength": 20.0}]
    response = httpx.put(f"{stack.url}/api/steering", json={"features": features}, timeout=60)
    assert response.status_code == 200, response.text
    reply = greedy(stack)
    expected = (reply.json()["choices"][0]["message"]["content"], reply.headers["x-millm-steering"])
    assert expected[1] == "active" and expected[0] != plain
    # Either feature alone gives another text: both count, so a restart that lost one would show.
    for alone in (features[:1], features[1:]):
        text = httpx.post(f"{stack.url}/v1/chat/completions", timeout=30, json={
            "model": "tiny-llama", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16,
            "temperature": 0, "steering": {"features": alone}}).json()["choices"][0]["message"]["content"]
        assert text != expected[0], alone

    before = children(stack.process.pid)["inference"][0]
    os.kill(before.pid, signal.SIGKILL)
    recovered_s, statuses = wait_for_steered_text(stack, expected, timeout_s=90)
    assert 500 not in statuses, statuses
    assert children(stack.process.pid)["inference"][0].pid != before.pid
    assert attached(stack) == [LATE, EARLY]
    saes = {s["name"]: s for s in httpx.get(f"{stack.url}/api/saes", timeout=10).json()["data"]}
    assert saes[LATE]["status"] == saes[EARLY]["status"] == "attached"
    state = httpx.get(f"{stack.url}/api/steering", timeout=10).json()["data"]
    assert [(f["index"], f.get("sae")) for f in state["features"]] == [(CAT, None), (42, EARLY)]
    print(f"\ninference kill -9 with two SAEs: both attached and steered again after {recovered_s:.2f}s")


def test_with_two_inference_processes_a_restarted_one_attaches_both_saes_in_order(tmp_path):
    stack = LiveStack(tmp_path / "var", env={"MILLM_INFERENCE_PROCESSES": "2"})
    try:
        stack.wait_healthy()
        # Both processes serving with the default SAE attached before the broadcast (a process still loading
        # its model on a busy machine would answer the attach late and count as no_answer).
        wait_until(stack, lambda ps: len(ps) == 2 and all(p["attached_saes"] == [LATE] for p in ps), timeout_s=180)
        response = httpx.post(f"{stack.url}/api/saes/{EARLY}/attach", timeout=120)
        assert response.status_code == 200, response.text
        assert len(response.json()["data"]["processes"]["applied"]) == 2, response.json()["data"]["processes"]
        features = [{"index": CAT, "strength": 6.0}, {"sae": EARLY, "index": 42, "strength": 20.0}]
        assert httpx.put(f"{stack.url}/api/steering", json={"features": features}, timeout=60).status_code == 200
        expected = greedy(stack).json()["choices"][0]["message"]["content"]
        wait_until(stack, lambda ps: len(ps) == 2 and all(p["attached_saes"] == [LATE, EARLY] for p in ps))

        victim = processes(stack)[0]
        os.kill(victim["pid"], signal.SIGKILL)
        # The supervisor restarts it; it attaches both SAEs again, in order, and steers with both.
        fresh = wait_until(stack, lambda ps: len(ps) == 2 and victim["process_id"] not in {p["process_id"] for p in ps}
                           and all(p["attached_saes"] == [LATE, EARLY] and p["steering"] == "active" for p in ps),
                           timeout_s=120)
        assert len(fresh) == 2
        texts = {greedy(stack).json()["choices"][0]["message"]["content"] for _ in range(6)}
        assert texts == {expected}, texts
    finally:
        stack.stop()


def processes(stack: LiveStack) -> list[dict]:
    return httpx.get(f"{stack.url}/api/health", timeout=10).json()["data"]["processes"]


def wait_until(stack: LiveStack, holds, *, timeout_s: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    seen: list[dict] = []
    while time.monotonic() < deadline:
        seen = processes(stack)
        if holds(seen):
            return seen
        time.sleep(0.5)
    raise AssertionError(f"processes never matched: {seen}\n{stack.read_log()[-3000:]}")
