"""/metrics: valid Prometheus text exposition, counting exactly what observe_request was told."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitoring import metrics
from monitoring.metrics import MetricsRegistry


def parse(text: str) -> tuple[dict[str, str], dict[tuple[str, frozenset], float]]:
    """prometheus_client's own parser, plus what a scrape must also hold: every family typed, no duplicates."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(text):
        assert family.type in ("counter", "gauge", "histogram"), f"{family.name} has no # TYPE"
        types[f"{family.name}_total" if family.type == "counter" else family.name] = family.type
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = sample.value
    return types, samples


@pytest.mark.parametrize("bad", ["x_total 1\n", "# TYPE x counter\nx{a=\"1} 2\n", "# TYPE x gauge\nx 1"])
def test_the_parser_rejects_what_prometheus_would(bad):
    with pytest.raises((AssertionError, ValueError)):
        parse(bad)


def value(samples, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def check_histogram(samples, name: str, **labels) -> list[tuple[float, float]]:
    buckets = sorted(((float(dict(ls)["le"].replace("+Inf", "inf")), v) for (n, ls), v in samples.items()
                      if n == f"{name}_bucket" and set(labels.items()) <= set(ls)))
    counts = [c for _, c in buckets]
    assert counts == sorted(counts), "buckets must be cumulative"
    assert buckets[-1][0] == math.inf and buckets[-1][1] == value(samples, f"{name}_count", **labels)
    return buckets


def test_exposition_counts_requests_tokens_and_timings():
    registry = MetricsRegistry()
    registry.observe_request(endpoint="chat.completions", model="tiny", status="completed", latency_s=0.2,
                             ttft_s=0.03, prompt_tokens=5, completion_tokens=10)
    registry.observe_request(endpoint="chat.completions", model="tiny", status="completed", latency_s=3.0,
                             ttft_s=None, prompt_tokens=7, completion_tokens=20)
    registry.observe_request(endpoint="completions", model="tiny", status="error", latency_s=0.01, ttft_s=None,
                             prompt_tokens=2, completion_tokens=0)
    registry.event_dropped(3)
    registry.event_dropped()
    types, samples = parse(registry.exposition(inference=None))
    assert types["millm_request_latency_seconds"] == "histogram" and types["millm_requests_total"] == "counter"
    assert value(samples, "millm_requests_total", endpoint="chat.completions", model="tiny", status="completed") == 2
    assert value(samples, "millm_requests_total", endpoint="completions", model="tiny", status="error") == 1
    assert value(samples, "millm_prompt_tokens_total", endpoint="chat.completions", model="tiny") == 12
    assert value(samples, "millm_generated_tokens_total", endpoint="chat.completions", model="tiny") == 30
    chat = {"endpoint": "chat.completions", "model": "tiny"}
    buckets = dict(check_histogram(samples, "millm_request_latency_seconds", **chat))
    assert (buckets[0.1], buckets[0.25], buckets[2.5], buckets[5.0]) == (0, 1, 1, 2)
    assert value(samples, "millm_request_latency_seconds_sum", **chat) == pytest.approx(3.2)
    assert value(samples, "millm_time_to_first_token_seconds_count", **chat) == 1  # a None TTFT is not observed
    assert value(samples, "millm_monitoring_events_dropped_total") == 4
    assert value(samples, "millm_inference_up") == 0
    assert not any(name == "millm_inference_queue_depth" for name, _ in samples)


def test_inference_gauges_come_from_the_ping():
    pong = {"queue_depth": 3, "active_requests": 2, "tokens_per_second": 41.5, "memory_bytes": 1024}
    _, samples = parse(MetricsRegistry().exposition(inference=pong, process_rss_bytes=99))
    assert value(samples, "millm_inference_up") == 1
    assert value(samples, "millm_inference_queue_depth") == 3
    assert value(samples, "millm_inference_active_requests") == 2
    assert value(samples, "millm_inference_tokens_per_second") == 41.5
    assert value(samples, "process_resident_memory_bytes") == 99


def test_label_values_are_escaped_and_model_names_are_capped():
    registry = MetricsRegistry()
    registry.observe_request(endpoint="completions", model='we"ird\\name\n', status="completed", latency_s=0.1,
                             ttft_s=0.1, prompt_tokens=1, completion_tokens=1)
    for i in range(metrics.MAX_MODEL_LABELS + 5):
        registry.observe_request(endpoint="completions", model=f"m{i}", status="error", latency_s=None,
                                 ttft_s=None, prompt_tokens=0, completion_tokens=0)
    text = registry.exposition(inference=None)
    assert 'model="we\\"ird\\\\name\\n"' in text  # escaped on the wire, the parser gives the name back
    _, samples = parse(text)
    assert value(samples, "millm_requests_total", endpoint="completions", model='we"ird\\name\n',
                 status="completed") == 1
    assert value(samples, "millm_requests_total", endpoint="completions", model="_other", status="error") == 6


def test_recent_window_percentiles_and_error_rate_expire_after_a_minute():
    now = [1000.0]
    registry = MetricsRegistry(clock=lambda: now[0])
    for i in range(1, 101):  # 10 ms .. 1000 ms
        registry.observe_request(endpoint="completions", model="m", status="error" if i % 10 == 0 else "completed",
                                 latency_s=i / 100, ttft_s=None, prompt_tokens=1, completion_tokens=2)
    recent = registry.recent()
    assert (recent.requests, recent.errors, recent.error_rate) == (100, 10, 0.1)
    assert recent.latency_p50_ms == pytest.approx(500) and recent.latency_p99_ms == pytest.approx(990)
    assert recent.generated_tokens == 200
    now[0] += metrics.WINDOW_S + 1
    assert registry.recent().requests == 0 and registry.recent().latency_p99_ms is None


def test_metrics_endpoint_counts_observe_request_calls(client, settings, monkeypatch):
    settings.INFERENCE_TIMEOUT_S = 0.2
    monkeypatch.setattr(metrics, "registry", MetricsRegistry())
    monkeypatch.setattr("monitoring.views.registry", metrics.registry)
    for _ in range(3):
        metrics.observe_request(endpoint="chat.completions", model="tiny", status="completed", latency_s=0.5,
                                ttft_s=0.05, prompt_tokens=4, completion_tokens=8)
    metrics.monitoring_event_dropped(n=2)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    _, samples = parse(response.content.decode())
    assert value(samples, "millm_requests_total", endpoint="chat.completions", model="tiny", status="completed") == 3
    assert value(samples, "millm_generated_tokens_total", endpoint="chat.completions", model="tiny") == 24
    assert value(samples, "millm_monitoring_events_dropped_total") == 2
    assert value(samples, "millm_inference_up") == 0  # no inference process in this test
    assert value(samples, "process_resident_memory_bytes") > 0
    assert client.post("/metrics").status_code == 405


def test_metrics_endpoint_with_a_live_inference_process(client, inference_worker):
    _, samples = parse(client.get("/metrics").content.decode())
    assert value(samples, "millm_inference_up") == 1
    assert value(samples, "millm_inference_queue_depth") == 0
