"""One /metrics scrape of the real stack covers the inference process too (multiprocess mode under serve).

Here rather than in tests/monitoring/ so it shares the session's one `live_stack`.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.live.conftest import load_tiny

SAE = "tiny-llama-layer_2"


def scrape(stack) -> dict[tuple[str, frozenset], float]:
    response = httpx.get(f"{stack.url}/metrics", timeout=10)
    assert response.status_code == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def hook_count(samples, stage: str) -> float:
    return samples.get(("millm_sae_hook_seconds_count", frozenset({("layer", "2"), ("stage", stage)})), 0.0)


def test_a_steered_generation_shows_in_the_inference_process_hook_histogram(live_stack):
    load_tiny(live_stack)
    attached = httpx.post(f"{live_stack.url}/api/saes/{SAE}/attach", timeout=300)
    assert attached.status_code == 200, attached.text
    shared = live_stack.var_dir / "prometheus"
    assert any(shared.glob("*.db")), "serve did not put the children in multiprocess mode"
    before = scrape(live_stack)
    reply = httpx.post(f"{live_stack.url}/v1/chat/completions", timeout=120, json={
        "model": "tiny-llama", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 5,
        "temperature": 0, "steering": {"features": [{"index": 7, "strength": 2.0}]}})
    assert reply.status_code == 200, reply.text
    after = scrape(live_stack)
    # Written by the inference process (layer 2 is the test SAE's hook layer), read by the web process.
    assert hook_count(after, "steering") > hook_count(before, "steering")
    assert hook_count(after, "encode") > hook_count(before, "encode")  # monitoring is on by default
    total = ("millm_requests_total", frozenset({("endpoint", "chat.completions"), ("model", "tiny-llama"),
                                                ("status", "completed")}))
    assert after[total] == before.get(total, 0) + 1
    samples = httpx.get(f"{live_stack.url}/api/monitoring/throughput?limit=5", timeout=10).json()
    assert samples["success"] is True and isinstance(samples["data"]["samples"], list)
    system = httpx.get(f"{live_stack.url}/api/monitoring/system", timeout=10).json()["data"]
    assert 0 <= system["health_score"] <= 100
