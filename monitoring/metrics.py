"""miLLM's Prometheus metrics, exposed by `prometheus_client` at /metrics (text format 0.0.4).

Multiprocess mode: when PROMETHEUS_MULTIPROC_DIR is set (`manage.py serve` sets it to var/prometheus
and empties it at start, see monitoring/prometheus_dir.py), every process writes its counters and
histograms to files there, and one scrape of any web process sums them over every web and inference
process (the inference process's SAE-hook timings come from engine/hook_timing.py that way). Without
it (a lone `daphne`, the tests) a scrape covers only the process that serves it.

The serving path calls `observe_request` once per /v1 request and the live activation stream calls
`monitoring_event_dropped`. Scrape-time gauges (is an inference process up, its queue, its
throughput, this web process's RSS) are read when /metrics is asked, not stored in the shared files:
a dead inference process must not leave its last numbers behind.
/metrics is outside /api and /v1, so MILLM_API_KEY does not guard it (as Prometheus scrapes expect).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WINDOW_S = 60.0  # what "the last minute" of the system page covers
WINDOW_MAX_SAMPLES = 50_000  # bounds memory at very high request rates (the oldest go first)
MAX_MODEL_LABELS = 100  # unknown model names are client input: past this many, new ones count as "_other"
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# `*_created` series did not exist before the move to prometheus_client and multiprocess mode
# cannot produce them: leave them out, so both modes expose the same series.
prometheus_client.disable_created_metrics()


def multiprocess_dir() -> str | None:
    """The shared folder when multiprocess mode is on (created here if missing), else None."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
    return path or None


@dataclass(frozen=True)
class RecentStats:
    """Requests finished in the last WINDOW_S seconds."""

    requests: int
    errors: int
    error_rate: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    generated_tokens: int


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    rank = max(1, math.ceil(q * len(ordered)))  # nearest rank
    return ordered[rank - 1]


class _ScrapeTimeGauges:
    """Gauges read at scrape time from the inference process's ping and this process."""

    def __init__(self, inference: dict[str, Any] | None, process_rss_bytes: int | None) -> None:
        self.inference = inference
        self.process_rss_bytes = process_rss_bytes

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("millm_inference_up", "1 when an inference process answered the ping.",
                                value=1 if self.inference is not None else 0)
        if self.inference is not None:  # stale numbers from a dead process would mislead: leave them out
            for name, key, help_text in (
                ("millm_inference_queue_depth", "queue_depth", "Generations waiting for a batch slot."),
                ("millm_inference_active_requests", "active_requests", "Generations running now."),
                ("millm_inference_tokens_per_second", "tokens_per_second", "Recent generation throughput."),
                ("millm_inference_model_memory_bytes", "memory_bytes", "Memory held by the loaded model."),
            ):
                yield GaugeMetricFamily(name, help_text, value=float(self.inference.get(key) or 0))
        if self.process_rss_bytes is not None:
            yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory of this web process.",
                                    value=self.process_rss_bytes)


class MetricsRegistry:
    REQUEST_LABELS = ("endpoint", "model", "status")
    TOKEN_LABELS = ("endpoint", "model")

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.lock = threading.Lock()  # observe_request may run on the event loop or in sync_to_async threads
        self.multiprocess_dir = multiprocess_dir()
        # Each instance has its own registry, so tests can count from zero in single-process mode.
        self.collectors = CollectorRegistry(auto_describe=True)
        self.requests = Counter("millm_requests_total", "Finished /v1 requests by endpoint, model and status.",
                                self.REQUEST_LABELS, registry=self.collectors)
        self.prompt_tokens = Counter("millm_prompt_tokens_total", "Prompt tokens of finished /v1 requests.",
                                     self.TOKEN_LABELS, registry=self.collectors)
        self.generated_tokens = Counter("millm_generated_tokens_total",
                                        "Tokens generated for finished /v1 requests.", self.TOKEN_LABELS,
                                        registry=self.collectors)
        self.latency = Histogram("millm_request_latency_seconds", "Time from request to last token.",
                                 self.TOKEN_LABELS, buckets=LATENCY_BUCKETS_S, registry=self.collectors)
        self.ttft = Histogram("millm_time_to_first_token_seconds", "Time from request to first generated token.",
                              self.TOKEN_LABELS, buckets=TTFT_BUCKETS_S, registry=self.collectors)
        self.events_dropped = Counter("millm_monitoring_events_dropped_total",
                                      "Activation frames dropped by the live stream's throttle.",
                                      registry=self.collectors)
        self.models: set[str] = set()
        self.window: deque[tuple[float, float, bool, int]] = deque(maxlen=WINDOW_MAX_SAMPLES)

    def _model_label(self, model: str) -> str:
        if model in self.models:
            return model
        if len(self.models) >= MAX_MODEL_LABELS:
            return "_other"
        self.models.add(model)
        return model

    def observe_request(self, *, endpoint: str, model: str, status: str, latency_s: float | None,
                        ttft_s: float | None, prompt_tokens: int, completion_tokens: int) -> None:
        with self.lock:
            model = self._model_label(model or "")
            completion = max(0, int(completion_tokens or 0))
            self.requests.labels(endpoint, model, status).inc()
            self.prompt_tokens.labels(endpoint, model).inc(max(0, int(prompt_tokens or 0)))
            self.generated_tokens.labels(endpoint, model).inc(completion)
            if latency_s is not None:
                self.latency.labels(endpoint, model).observe(latency_s)
            if ttft_s is not None:
                self.ttft.labels(endpoint, model).observe(ttft_s)
            self.window.append((self.clock(), latency_s if latency_s is not None else math.nan, status == "error",
                                completion))

    def event_dropped(self, n: int = 1) -> None:
        self.events_dropped.inc(max(0, int(n)))

    def recent(self) -> RecentStats:
        """This process's last minute (the system page's lights), not summed over processes."""
        with self.lock:
            horizon = self.clock() - WINDOW_S
            while self.window and self.window[0][0] < horizon:
                self.window.popleft()
            samples = list(self.window)
        latencies = sorted(s[1] * 1000 for s in samples if not math.isnan(s[1]))
        errors = sum(1 for s in samples if s[2])
        return RecentStats(requests=len(samples), errors=errors,
                           error_rate=errors / len(samples) if samples else 0.0,
                           latency_p50_ms=_percentile(latencies, 0.50), latency_p99_ms=_percentile(latencies, 0.99),
                           generated_tokens=sum(s[3] for s in samples))

    def exposition(self, *, inference: dict[str, Any] | None, process_rss_bytes: int | None = None) -> str:
        """The whole scrape; `inference` is the inference process's ping answer, None when it did not answer."""
        scrape = CollectorRegistry(auto_describe=False)
        if self.multiprocess_dir:
            MultiProcessCollector(scrape, path=self.multiprocess_dir)  # every process's files, summed
        else:
            scrape.register(_Forward(self.collectors))
        scrape.register(_ScrapeTimeGauges(inference, process_rss_bytes))
        return generate_latest(scrape).decode()


class _Forward:
    """Lets one registry's metrics be collected through another (the scrape's)."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterable[Metric]:
        return self.source.collect()


registry = MetricsRegistry()


def observe_request(*, endpoint: str, model: str, status: str, latency_s: float | None, ttft_s: float | None,
                    prompt_tokens: int, completion_tokens: int) -> None:
    """Count one finished /v1 request (status: completed, cancelled or error)."""
    registry.observe_request(endpoint=endpoint, model=model, status=status, latency_s=latency_s, ttft_s=ttft_s,
                             prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


def monitoring_event_dropped(n: int = 1) -> None:
    registry.event_dropped(n)


def recent_stats() -> RecentStats:
    return registry.recent()
