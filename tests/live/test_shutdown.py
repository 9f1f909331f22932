"""SIGTERM while streams are in flight: each ends with an OpenAI error event and `data: [DONE]` (or its own
finish), never a bare cut. Times are printed (`pytest -s`) and recorded in docs/operations.md."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.live.conftest import LiveStack, load_tiny
from tests.live.test_faults import children

STREAMS = 3


def _read_stream(url: str, started: threading.Event, out: dict) -> None:
    """Read one long chat stream to its end; record every data event and how the connection ended."""
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Tell me a long story"}],
            "max_tokens": 900, "ignore_eos": True, "stream": True, "temperature": 0}
    events: list[str] = []
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            out["status"] = response.status_code
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    if len(events) >= 3:
                        started.set()
        out["ended"] = "closed"
    except httpx.HTTPError as exc:
        out["ended"] = f"cut: {type(exc).__name__}"
    out["events"] = events
    out["finished_at"] = time.monotonic()
    started.set()


def _post_plain(url: str, out: dict) -> None:
    """A non-streaming chat in flight at SIGTERM: its answer, or a 503 in OpenAI's shape, never a cut."""
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Tell me a long story"}],
            "max_tokens": 900, "ignore_eos": True, "temperature": 0}
    try:
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        out["status"], out["body"] = response.status_code, response.json()
    except httpx.HTTPError as exc:
        out["status"] = f"cut: {type(exc).__name__}"


def _check_ending(out: dict) -> str:
    """'error' (error event then [DONE]) or 'completed' (finish_reason then [DONE]); fails on anything else."""
    events = out["events"]
    assert out["status"] == 200
    assert out["ended"] == "closed", f"stream cut: {out['ended']}; last events {events[-2:]}"
    assert events and events[-1] == "[DONE]", f"no [DONE]; last events {events[-2:]}"
    last = json.loads(events[-2])
    if "error" in last:
        assert last["error"]["code"] == "service_unavailable"
        assert last["error"]["type"] == "server_error"
        assert "shutting down" in last["error"]["message"]
        return "error"
    assert last["choices"][0]["finish_reason"] in ("length", "stop"), last
    return "completed"


@pytest.mark.parametrize("target", ["supervisor", "daphne"])
def test_sigterm_ends_streams_in_flight_with_an_error_event_and_done(tmp_path, target):
    stack = LiveStack(tmp_path / "var")
    try:
        stack.wait_healthy()
        load_tiny(stack)
        outs = [{} for _ in range(STREAMS)]
        started = [threading.Event() for _ in range(STREAMS)]
        readers = [threading.Thread(target=_read_stream, args=(stack.url, s, o)) for s, o in zip(started, outs, strict=True)]
        for reader in readers:
            reader.start()
        for event in started:
            assert event.wait(60), "a stream did not start"
        plain: dict = {}
        plain_reader = threading.Thread(target=_post_plain, args=(stack.url, plain))
        plain_reader.start()
        time.sleep(1.0)  # the non-streaming request is in flight (0.2 s raced daphne accepting it on a loaded machine)
        pid = stack.process.pid if target == "supervisor" else children(stack.process.pid)["web"][0].pid
        os.kill(pid, signal.SIGTERM)
        signalled = time.monotonic()
        for reader in readers:
            reader.join(30)
            assert not reader.is_alive(), "a stream hung after SIGTERM"
        plain_reader.join(30)
        assert plain["status"] in (200, 503), plain
        if plain["status"] == 503:
            assert plain["body"]["error"]["code"] == "service_unavailable", plain
        else:
            assert plain["body"]["usage"]["completion_tokens"] == 900
        endings = [_check_ending(out) for out in outs]
        closed_s = max(out["finished_at"] for out in outs) - signalled
        tokens = [len(out["events"]) for out in outs]
        print(f"\nSIGTERM to {target}: {STREAMS} streams ended {endings} within {closed_s:.2f}s "
              f"(events read: {tokens}); a non-streaming request in flight got {plain['status']}")
        assert "error" in endings, "every stream completed before SIGTERM reached it: make them longer"
        assert closed_s < 5
    finally:
        stack.stop()
