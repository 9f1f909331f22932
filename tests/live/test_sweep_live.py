"""The compare's token diff and POST /api/steering/sweep on the live stack (test tier): inline, as a Celery job
polled through GET /api/steering/sweeps/{id}, and bad input refused with nothing started."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.live.conftest import load_tiny

CAT = 7
SAE = "tiny-llama-layer_2"


@pytest.fixture(scope="module")
def stack(live_stack):
    load_tiny(live_stack)
    assert httpx.post(f"{live_stack.url}/api/saes/{SAE}/attach", timeout=300).status_code == 200
    return live_stack


def sweeps_in_history(stack) -> int:
    page = httpx.get(f"{stack.url}/api/monitoring/history", params={"endpoint": "sweep"}, timeout=30).json()
    return page["data"]["total"]


def test_compare_carries_the_token_diff(stack):
    body = {"prompt": "Hello!", "features": [{"index": CAT, "strength": 2.0}], "units": "residual_norm",
            "max_tokens": 12}
    answers = [httpx.post(f"{stack.url}/api/steering/compare", json=body, timeout=120) for _ in range(2)]
    assert all(a.status_code == 200 for a in answers), answers[0].text
    data = answers[0].json()["data"]
    diff = data["token_diff"]
    assert "".join(t["token"] for t in diff["tokens"]) == data["steered"]["text"]
    assert diff["first_divergence"] is not None and any(f["index"] == CAT for f in diff["top_changed_features"])
    assert answers[1].json()["data"]["token_diff"] == diff  # exact at temperature 0


def test_sweeps_inline_and_as_a_job(stack):
    inline = httpx.post(f"{stack.url}/api/steering/sweep", timeout=120, json={
        "features": [{"index": CAT}], "strengths": [0.5, 2.0], "units": "residual_norm", "prompts": ["Hello!"],
        "max_tokens": 12}).json()["data"]
    assert inline["status"] == "done"
    points = {p["strength"]: p for p in inline["result"]["points"]}
    assert points[2.0]["concept_score"] > points[0.0]["concept_score"] and points[2.0]["token_hits"] == 1.0

    queued = httpx.post(f"{stack.url}/api/steering/sweep", timeout=60, json={
        "features": [{"index": CAT}], "strengths": "auto", "units": "residual_norm", "max_tokens": 8}).json()["data"]
    assert queued["status"] == "queued"  # 6 strengths × 3 default prompts: the Celery worker runs it
    deadline, seen = time.monotonic() + 180, set()
    while time.monotonic() < deadline:
        job = httpx.get(f"{stack.url}/api/steering/sweeps/{queued['id']}", timeout=30).json()["data"]
        seen.add(job["status"])
        if job["status"] in ("done", "failed"):
            break
        time.sleep(0.5)
    assert job["status"] == "done", job
    assert len(job["result"]["points"]) == 6 and len(job["result"]["prompts"]) == 3


def test_bad_sweeps_start_nothing(stack):
    before = sweeps_in_history(stack)
    for body, expected in (({"features": []}, (422, "VALIDATION_ERROR")),
                           ({"features": [{"index": 10**6}]}, (400, "INVALID_FEATURE_INDEX")),
                           ({"features": [{"index": CAT}], "strengths": list(range(1, 16)),
                             "prompts": ["a", "b", "c", "d", "e"]}, (422, "VALIDATION_ERROR"))):
        response = httpx.post(f"{stack.url}/api/steering/sweep", json=body, timeout=30)
        assert (response.status_code, response.json()["error"]["code"]) == expected, response.text
    assert sweeps_in_history(stack) == before
