"""GET /api/monitoring/throughput: the inference process's throughput-versus-memory samples, newest first."""

from __future__ import annotations

import time

import pytest

from engine.generation import FinishEvent, GenerationRequest
from engine.sampling import SamplingParams

FIELDS = {"timestamp", "model", "interval_s", "tokens_per_second", "tokens", "batch_size", "max_batch_size",
          "queue_depth", "rss_bytes", "gpu_allocated_bytes"}


@pytest.mark.parametrize("limit", ["0", "-3", "1001", "many", "2.5", ""])
def test_a_bad_limit_is_a_422_envelope(client, limit):
    response = client.get(f"/api/monitoring/throughput?limit={limit}")
    assert response.status_code == 422
    body = response.json()
    assert body["success"] is False and body["data"] is None and body["error"]["code"] == "VALIDATION_ERROR"
    assert "limit" in body["error"]["message"]


def test_without_an_inference_process_it_is_a_503(client, settings):
    settings.INFERENCE_TIMEOUT_S = 0.2
    response = client.get("/api/monitoring/throughput")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "INFERENCE_UNAVAILABLE"


def test_samples_taken_while_generating_newest_first(client, inference_worker, test_tier_assets):
    runtime = inference_worker.calls.runtime
    runtime.throughput.interval_s = 0.05  # read by the sampler each round; the default is a few seconds
    runtime.load(name="tiny", path=str(test_tier_assets.model.local_path))
    try:
        deadline = time.monotonic() + 60
        while len(runtime.throughput.samples()) < 3 and time.monotonic() < deadline:
            handles = [runtime.scheduler.submit(GenerationRequest("The cat", SamplingParams(max_tokens=24)))
                       for _ in range(3)]
            for handle in handles:
                assert isinstance(list(handle)[-1], FinishEvent)
        runtime.throughput.stop()  # a still ring while the two answers are compared
        body = client.get("/api/monitoring/throughput?limit=2").json()
        assert body["success"] is True
        samples = body["data"]["samples"]
        assert body["data"]["count"] == len(samples) == 2
        assert set(samples[0]) == FIELDS
        assert samples[0]["timestamp"] >= samples[1]["timestamp"]
        assert all(s["model"] == "tiny" and s["rss_bytes"] > 0 and 0 <= s["batch_size"] <= s["max_batch_size"]
                   for s in samples)
        assert any(s["tokens"] > 0 and s["tokens_per_second"] > 0 for s in samples)
        everything = client.get("/api/monitoring/throughput").json()["data"]
        assert everything["count"] >= 3 and everything["samples"][:2] == samples
    finally:
        runtime.unload()
