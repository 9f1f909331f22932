"""Live monitoring on the real stack: per-token features reach WebSocket clients and the pages."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
import websockets

from tests.live.conftest import load_tiny

SAE = "tiny-llama-layer_2"
PROMPT = "The cat sat by the river in winter"


@pytest.fixture(scope="module")
def monitored_stack(live_stack):
    load_tiny(live_stack)
    assert httpx.post(f"{live_stack.url}/api/saes/{SAE}/attach", timeout=300).status_code == 200
    httpx.delete(f"{live_stack.url}/api/steering", timeout=60)
    return live_stack


def test_websocket_receives_activation_updates_matching_the_request(monitored_stack):
    ws_url = monitored_stack.url.replace("http", "ws") + "/ws/monitor/?format=json"

    async def scenario():
        frames: list[dict] = []
        event_times: list[float] = []
        async with websockets.connect(ws_url) as ws:
            assert json.loads(await ws.recv())["kind"] == "connected"
            client = openai.AsyncOpenAI(base_url=f"{monitored_stack.url}/v1", api_key="x", max_retries=0)
            stream = await client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=40,
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True})
            async for _ in stream:
                pass
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    event = json.loads(await asyncio.wait_for(ws.recv(), 1.5))
                except TimeoutError:
                    break
                if event["kind"] == "activation_update":
                    event_times.append(event["payload"]["timestamp"])  # when the server published it
                    frames.extend(event["payload"]["frames"])
        return frames, event_times

    frames, event_times = asyncio.run(scenario())
    mine = [f for f in frames if f["type"] == "prompt" and f["position"] < 8]
    assert mine, "no prompt frames arrived"
    inspected = httpx.post(f"{monitored_stack.url}/api/inspect", json={"text": PROMPT}, timeout=60).json()["data"]
    by_position = {t["position"]: t for t in inspected["tokens"]}
    for frame in mine:
        assert frame["token"] == by_position[frame["position"]]["token"]
        assert frame["features"] == pytest.approx(by_position[frame["position"]]["features"], abs=1e-3)
    generated = [f for f in frames if f["type"] == "generated"]
    assert len(generated) >= 30  # 40 generated tokens, the last one's features come with no further pass
    # The throttle: never more than MILLM_MONITOR_MAX_HZ (10) events per second.
    gaps = [b - a for a, b in zip(event_times, event_times[1:], strict=False)]
    assert len(event_times) >= 2 and all(gap >= 0.099 for gap in gaps), gaps


def test_the_cat_feature_fires_on_cat_in_inspect(monitored_stack):
    tokens = httpx.post(f"{monitored_stack.url}/api/inspect", json={"text": PROMPT}, timeout=60).json()["data"]["tokens"]
    cat = next(t for t in tokens if t["token"] == " cat")
    assert max(cat["features"], key=cat["features"].get) == "7"
    assert cat["labels"]["7"] == "token ' cat'" if "labels" in cat else True


def test_statistics_accumulate_and_reset(monitored_stack):
    url = monitored_stack.url
    httpx.delete(f"{url}/api/monitoring/statistics")
    httpx.post(f"{url}/v1/completions", json={"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 5}, timeout=60)
    stats = httpx.get(f"{url}/api/monitoring/statistics").json()["data"]
    assert stats["total_tokens"] >= 8
    top = httpx.post(f"{url}/api/monitoring/statistics/top", json={"n": 3, "by": "max"}).json()["data"]["top"]
    assert len(top) == 3 and top[0]["max"] >= top[1]["max"] >= top[2]["max"]
    httpx.delete(f"{url}/api/monitoring/statistics")
    assert httpx.get(f"{url}/api/monitoring/statistics").json()["data"]["total_tokens"] == 0


def test_configure_top_k_and_always_reported_features(monitored_stack):
    url = monitored_stack.url
    configured = httpx.post(f"{url}/api/monitoring/configure", json={"top_k": 2, "features": [42]}).json()["data"]
    assert configured["top_k"] == 2 and configured["features"] == [42]
    tokens = httpx.post(f"{url}/api/inspect", json={"text": PROMPT}, timeout=60).json()["data"]["tokens"]
    assert all(len(t["features"]) <= 3 and "42" in t["features"] for t in tokens)
    httpx.post(f"{url}/api/monitoring/configure", json={"top_k": 10, "features": []})
    bad = httpx.post(f"{url}/api/monitoring/configure", json={"top_k": 0})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "VALIDATION_ERROR"


def test_streamed_frames_match_the_stored_history(monitored_stack):
    url = monitored_stack.url

    async def scenario():
        frames: list[dict] = []
        async with websockets.connect(url.replace("http", "ws") + "/ws/monitor/?format=json") as ws:
            await ws.recv()
            async with httpx.AsyncClient(timeout=60) as client, client.stream(
                    "POST", f"{url}/v1/chat/completions", json={
                        "model": "tiny-llama", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 12,
                        "temperature": 0, "stream": True}) as response:
                request_id = response.headers["x-request-id"]
                async for _ in response.aiter_lines():
                    pass
            while True:
                try:
                    event = json.loads(await asyncio.wait_for(ws.recv(), 1.5))
                except TimeoutError:
                    return request_id, frames
                if event["kind"] == "activation_update":
                    frames.extend(f for f in event["payload"]["frames"] if f["request_id"] == request_id)

    request_id, frames = asyncio.run(scenario())
    record = httpx.get(f"{url}/api/monitoring/history/{request_id}").json()["data"]
    stored = {(f["position"], f["type"]): f for f in record["token_features"]}
    assert frames and len(stored) == len(frames)
    for frame in frames:
        match = stored[(frame["position"], frame["type"])]
        assert match["token"] == frame["token"] and match["features"] == frame["features"]
    assert record["status"] == "completed" and record["completion_tokens"] >= 1
