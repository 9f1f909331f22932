"""Multiprocess mode: two web processes and an inference process write, one /metrics scrape sums them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from monitoring.metrics import MetricsRegistry
from monitoring.prometheus_dir import prometheus_dir_prepare
from tests.monitoring.test_metrics import check_histogram, parse, value

ROOT = Path(__file__).resolve().parent.parent.parent

WEB = """
from monitoring.metrics import monitoring_event_dropped, observe_request
for _ in range({n}):
    observe_request(endpoint="chat.completions", model="tiny", status="completed", latency_s=0.2, ttft_s=0.03,
                    prompt_tokens=5, completion_tokens=10)
monitoring_event_dropped({n})
"""
INFERENCE = """
from engine.hook_timing import StageTimer
timer = StageTimer(3)
for _ in range(4):
    timer.encode(200_000)  # 0.2 ms
timer.steering(2_000_000)
"""


def run_process(code: str, multiproc_dir: Path) -> None:
    """A fresh interpreter, as each daphne or inference process is: values go to its own pid's files."""
    env = {"PATH": "/usr/bin:/bin", "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)}
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, check=True, timeout=60)


def test_one_scrape_sums_every_process(tmp_path, monkeypatch, client, settings):
    shared = tmp_path / "prometheus"
    run_process(WEB.format(n=3), shared)
    run_process(WEB.format(n=4), shared)
    run_process(INFERENCE, shared)
    assert len(list(shared.glob("counter_*.db"))) == 2 and len(list(shared.glob("histogram_*.db"))) == 3

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(shared))
    monkeypatch.setattr("monitoring.views.registry", MetricsRegistry())
    settings.INFERENCE_TIMEOUT_S = 0.2
    response = client.get("/metrics")
    assert response.status_code == 200
    types, samples = parse(response.content.decode())
    chat = {"endpoint": "chat.completions", "model": "tiny"}
    assert value(samples, "millm_requests_total", **chat, status="completed") == 7
    assert value(samples, "millm_generated_tokens_total", **chat) == 70
    assert value(samples, "millm_monitoring_events_dropped_total") == 7
    buckets = dict(check_histogram(samples, "millm_request_latency_seconds", **chat))
    assert (buckets[0.1], buckets[0.25]) == (0, 7)
    # The inference process's hook timings, written by another process, in the same scrape.
    assert types["millm_sae_hook_seconds"] == "histogram"
    encode = dict(check_histogram(samples, "millm_sae_hook_seconds", layer="3", stage="encode"))
    assert (encode[0.0001], encode[0.00025]) == (0, 4)
    assert value(samples, "millm_sae_hook_seconds_count", layer="3", stage="steering") == 1
    assert value(samples, "millm_inference_up") == 0 and value(samples, "process_resident_memory_bytes") > 0


def test_serve_prepares_an_empty_shared_folder_for_its_children(tmp_path, monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    stale = tmp_path / "prometheus"
    stale.mkdir()
    (stale / "counter_123.db").write_bytes(b"old run")
    (stale / "notes.txt").write_text("not ours")
    path = prometheus_dir_prepare(var_dir=tmp_path)
    assert path == stale and sorted(p.name for p in path.iterdir()) == ["notes.txt"]
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(path)
    chosen = tmp_path / "elsewhere" / "metrics"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(chosen))
    assert prometheus_dir_prepare(var_dir=tmp_path) == chosen and chosen.is_dir()
