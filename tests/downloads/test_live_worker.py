"""Downloads on the live stack: the API queues, a real Celery worker transfers, progress arrives over the WebSocket."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import websockets

from tests.downloads.conftest import MODEL_REPO, SAE_PATH, SAE_REPO, WIDE_REPO, assert_same_files
from tests.live.conftest import ROOT, LiveStack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(hub_server, tmp_path_factory):
    live = LiveStack(tmp_path_factory.mktemp("download-stack") / "var", env={"HF_ENDPOINT": hub_server.url})
    live.wait_healthy()
    yield live
    live.stop()


def download_and_watch(stack: LiveStack, path: str, body: dict, *, until, timeout_s: float = 90) -> list[dict]:
    """POST a download, then collect /ws/progress/ events until `until(events)` holds."""

    async def scenario() -> list[dict]:
        url = stack.url.replace("http", "ws") + "/ws/progress/?format=json"
        async with websockets.connect(url) as ws, httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["kind"] == "connected"
            response = await http.post(path, json=body)
            assert response.status_code == 202, response.text
            download_id = response.json()["data"]["id"]
            events: list[dict] = []
            deadline = time.monotonic() + timeout_s
            while not until(events):
                event = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic())))
                if event["kind"] != "download_progress" or event["payload"]["id"] == download_id:
                    events.append(event)
            return events

    return asyncio.run(scenario())


def progress(events: list[dict]) -> list[dict]:
    return [e["payload"] for e in events if e["kind"] == "download_progress"]


def finished(events: list[dict]) -> bool:
    return any(p["status"] in ("completed", "failed", "cancelled") for p in progress(events))


def test_model_download_through_the_worker_streams_progress(stack, hub_server, hub_sources):
    hub_server.reset()
    hub_server.chunk_delay_s = 0.002  # ~3 s for the weights: several progress events on the way

    events = download_and_watch(stack, "/api/models/download", {"repo_id": WIDE_REPO, "name": "wide"}, until=finished)

    states = progress(events)
    assert states[0]["status"] == "queued" and states[-1]["status"] == "completed", states[-1]
    done = [p["bytes_done"] for p in states]
    assert done == sorted(done) and done[-1] == states[-1]["bytes_total"] > 20 * 1024 * 1024
    assert any(0 < p["bytes_done"] < p["bytes_total"] for p in states if p["status"] == "running")
    assert "model.safetensors" in {p["current_file"] for p in states}
    assert any(e["kind"] == "model_status" and e["payload"]["name"] == "wide" for e in events)

    model = httpx.get(f"{stack.url}/api/models/wide").json()["data"]
    assert model["status"] == "ready" and model["hidden_size"] == 384
    assert Path(model["local_path"]).is_relative_to(stack.var_dir / "models")
    assert_same_files(hub_sources[WIDE_REPO], Path(model["local_path"]))

    deleted = httpx.delete(f"{stack.url}/api/models/wide").json()["data"]
    assert deleted["removed_folders"] == [model["local_path"]] and not Path(model["local_path"]).exists()


def test_cancel_reaches_the_worker_mid_transfer(stack, hub_server):
    hub_server.reset()
    hub_server.chunk_delay_s = 0.005  # ~9 s for the weights unless cancelled
    response = httpx.post(f"{stack.url}/api/models/download", json={"repo_id": WIDE_REPO, "name": "wide-cancelled"})
    download_id = response.json()["data"]["id"]
    deadline = time.monotonic() + 30
    while not hub_server.gets_of("model.safetensors"):  # the worker is inside the weights' transfer
        assert time.monotonic() < deadline, httpx.get(f"{stack.url}/api/downloads/{download_id}").json()
        time.sleep(0.05)

    cancelled_at = time.monotonic()
    httpx.post(f"{stack.url}/api/downloads/{download_id}/cancel").raise_for_status()
    while (state := httpx.get(f"{stack.url}/api/downloads/{download_id}").json()["data"])["status"] == "running":
        assert time.monotonic() - cancelled_at < 20, state
        time.sleep(0.1)

    assert state["status"] == "cancelled" and state["bytes_done"] < state["bytes_total"]
    assert httpx.get(f"{stack.url}/api/models/wide-cancelled").status_code == 404
    assert not (stack.var_dir / "models" / WIDE_REPO.replace("/", "--")).exists()


def test_sae_download_through_the_worker(stack, hub_server, hub_sources):
    hub_server.reset()
    body = {"model": "tiny-llama", "repo_id": SAE_REPO, "path": SAE_PATH, "name": "tiny-llama-hub-sae"}

    events = download_and_watch(stack, "/api/saes/download", body, until=finished)

    assert progress(events)[-1]["status"] == "completed", progress(events)[-1]
    sae = httpx.get(f"{stack.url}/api/saes/tiny-llama-hub-sae").json()["data"]
    assert (sae["model"], sae["layer"], sae["d_sae"], sae["status"]) == ("tiny-llama", 2, 256, "ready")
    assert_same_files(hub_sources[SAE_REPO], Path(sae["local_path"]))


def test_celery_call_from_the_command_line(stack, hub_server, hub_sources):
    """The command docs/downloads.md gives: the worker creates the rows and downloads."""
    hub_server.reset()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["MILLM_VAR_DIR"] = str(stack.var_dir)
    kwargs = json.dumps({"repo_id": MODEL_REPO, "name": "via-celery-call"})
    call = subprocess.run([sys.executable, "-m", "celery", "-A", "millm_site", "call", "downloads.tasks.download_model",
                           "--kwargs", kwargs], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert call.returncode == 0, call.stderr

    deadline = time.monotonic() + 60
    while (model := httpx.get(f"{stack.url}/api/models/via-celery-call").json())["data"] is None or \
            model["data"]["status"] != "ready":
        assert time.monotonic() < deadline, model
        time.sleep(0.2)
    assert_same_files(hub_sources[MODEL_REPO], Path(model["data"]["local_path"]))
