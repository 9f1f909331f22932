"""Faults on `make run`'s process tree: each one heals by itself and none leaves an orphan.

Recovery times are printed (`pytest -s`) and recorded in docs/operations.md ("Failure modes").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from tests.live.conftest import ROOT, LiveStack, free_port

CAT = 7  # the test tier's feature for the token ' cat' (engine/assets/tiny.py)
SAE = "tiny-llama-layer_2"
MARKERS = (("web", "daphne"), ("inference", "run_inference"), ("worker", "celery"), ("redis", "redis-server"))


def children(pid: int) -> dict[str, list[psutil.Process]]:
    found: dict[str, list[psutil.Process]] = {}
    for child in psutil.Process(pid).children(recursive=False):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        for name, marker in MARKERS:
            if marker in cmd:
                found.setdefault(name, []).append(child)
    return found


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def celery_ping(stack: LiveStack) -> int:
    """How many Celery workers answer a ping through the stack's (embedded) broker."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["MILLM_VAR_DIR"] = str(stack.var_dir)
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "millm_site", "inspect", "ping", "-t", "5"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    return done.stdout.count("pong")


def greedy(stack: LiveStack, *, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{stack.url}/v1/chat/completions", timeout=timeout, json={
        "model": "tiny-llama", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16, "temperature": 0})


def wait_for_steered_text(stack: LiveStack, expected: tuple[str, str], *, timeout_s: float) -> tuple[float, list[int]]:
    """Poll until a request gives the expected (text, steering label); returns (seconds, statuses seen)."""
    start = time.monotonic()
    statuses: list[int] = []
    while time.monotonic() - start < timeout_s:
        try:
            response = greedy(stack, timeout=10)
        except httpx.HTTPError:
            statuses.append(0)  # connection refused while daphne restarts
            time.sleep(0.2)
            continue
        statuses.append(response.status_code)
        if response.status_code == 200:
            got = (response.json()["choices"][0]["message"]["content"], response.headers["x-millm-steering"])
            if got == expected:
                return time.monotonic() - start, statuses
        time.sleep(0.2)
    raise AssertionError(f"no steered answer within {timeout_s}s; statuses {statuses[-20:]}\n{stack.read_log()[-4000:]}")


@pytest.fixture(scope="module")
def steered(tmp_path_factory):
    """Its own stack (faults would disturb the shared one): tiny model loaded, SAE attached, steering set."""
    stack = LiveStack(tmp_path_factory.mktemp("faults") / "var")
    stack.wait_healthy()
    response = httpx.put(f"{stack.url}/api/steering", timeout=60,
                         json={"features": [{"index": CAT, "strength": 2.0}], "units": "residual_norm"})
    assert response.status_code == 200, response.text
    reply = greedy(stack)
    assert reply.status_code == 200, reply.text
    stack.expected = (reply.json()["choices"][0]["message"]["content"], reply.headers["x-millm-steering"])
    assert stack.expected[1] == "active" and "cat" in stack.expected[0]
    yield stack
    stack.stop()


def assert_same_state(stack: LiveStack) -> None:
    inference = httpx.get(f"{stack.url}/api/health", timeout=10).json()["data"]["inference"]
    assert (inference["loaded_model"], inference["attached_sae"]) == ("tiny-llama", SAE)


def test_killed_redis_is_restarted_and_every_process_recovers_its_state(steered):
    before = children(steered.process.pid)
    redis_server = before["redis"][0]
    os.kill(redis_server.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    deadline = killed_at + 15
    while time.monotonic() < deadline:
        now = children(steered.process.pid).get("redis", [])
        if now and now[0].pid != redis_server.pid:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"redis-server was not restarted\n{steered.read_log()[-3000:]}")
    redis_back_s = time.monotonic() - killed_at
    recovered_s, statuses = wait_for_steered_text(steered, steered.expected, timeout_s=15)
    # While the broker is away a request is refused cleanly, never a 500.
    assert 500 not in statuses, statuses
    assert_same_state(steered)
    # Celery reconnected to the new Redis too: its worker answers a ping over the broker.
    assert httpx.get(f"{steered.url}/api/health", timeout=10).json()["data"]["redis"] == "ok"
    assert any(celery_ping(steered) == 1 for _ in range(3))  # it retries its broker every 2 s
    print(f"\nredis kill -9: redis back in {redis_back_s:.2f}s, steered answer again {recovered_s:.2f}s later")


def test_killed_inference_process_is_restarted_with_its_state(steered):
    before = children(steered.process.pid)["inference"][0]
    os.kill(before.pid, signal.SIGKILL)
    # A fresh process imports torch and loads the model again: 18-30 s measured on 2 busy cores.
    recovered_s, statuses = wait_for_steered_text(steered, steered.expected, timeout_s=60)
    assert 500 not in statuses, statuses
    assert children(steered.process.pid)["inference"][0].pid != before.pid
    assert_same_state(steered)
    print(f"\ninference kill -9: steered answer again after {recovered_s:.2f}s")


def test_killed_daphne_is_restarted_and_serves_again(steered):
    before = children(steered.process.pid)["web"][0]
    os.kill(before.pid, signal.SIGKILL)
    recovered_s, _ = wait_for_steered_text(steered, steered.expected, timeout_s=30)
    assert children(steered.process.pid)["web"][0].pid != before.pid
    print(f"\ndaphne kill -9: steered answer again after {recovered_s:.2f}s")


def test_kill_9_of_the_supervisor_leaves_no_orphan_and_the_port_binds_again(tmp_path):
    port = free_port()
    stack = LiveStack(tmp_path / "var", extra_args=("--skip-demo",), port=port)
    stack.wait_healthy()
    kids = [p for group in children(stack.process.pid).values() for p in group]
    assert {"web", "inference", "worker", "redis"} == set(children(stack.process.pid))
    os.kill(stack.process.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    while any(alive(p) for p in kids) and time.monotonic() - killed_at < 10:
        time.sleep(0.05)
    gone_s = time.monotonic() - killed_at
    left = [" ".join(p.cmdline()) for p in kids if alive(p)]
    for p in kids:  # never leave them behind for the next test, even when this one fails
        if alive(p):
            p.kill()
    stack.stop()
    assert not left, f"orphans after kill -9 of the supervisor: {left}"
    again = LiveStack(tmp_path / "var", extra_args=("--skip-demo",), port=port)
    try:
        again.wait_healthy(timeout_s=60)
    finally:
        again.stop()
    print(f"\nsupervisor kill -9: all {len(kids)} children gone in {gone_s:.2f}s; port {port} served again")


def test_sigterm_stops_every_child_within_the_grace_period(tmp_path):
    stack = LiveStack(tmp_path / "var", extra_args=("--skip-demo",))
    stack.wait_healthy()
    kids = [p for group in children(stack.process.pid).values() for p in group]
    started = time.monotonic()
    assert stack.stop() == 0
    stopped_s = time.monotonic() - started
    assert not any(alive(p) for p in kids)
    assert stopped_s < 10 + 5  # the supervisor's grace period, then SIGKILL
    print(f"\nsupervisor SIGTERM: {len(kids)} children stopped in {stopped_s:.2f}s")


def test_n_inference_processes_start_and_restart_independently(tmp_path):
    stack = LiveStack(tmp_path / "var", extra_args=("--skip-demo",), env={"MILLM_INFERENCE_PROCESSES": "2"})
    try:
        stack.wait_healthy()
        first, second = children(stack.process.pid)["inference"]
        os.kill(first.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = {p.pid for p in children(stack.process.pid).get("inference", [])}
            if len(now) == 2 and first.pid not in now:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the killed inference process was not restarted\n{stack.read_log()[-3000:]}")
        assert second.pid in now  # its sibling was left alone
        stack.wait_healthy(timeout_s=30)
    finally:
        stack.stop()
