"""Request metrics of this web process, in Prometheus text format (exposition format 0.0.4) at /metrics.

Metrics live in the memory of each web process: they start at zero when it starts, and with several
web processes each /metrics answer covers only the process that served it (scrape each one; sum in
PromQL). The serving path calls `observe_request` once per /v1 request and the live activation stream
calls `monitoring_event_dropped`; the inference gauges come from a `ping` at scrape time.
/metrics is outside /api and /v1, so MILLM_API_KEY does not guard it (as Prometheus scrapes expect).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WINDOW_S = 60.0  # what "the last minute" of the system page covers
WINDOW_MAX_SAMPLES = 50_000  # bounds memory at very high request rates (the oldest go first)
MAX_MODEL_LABELS = 100  # unknown model names are client input: past this many, new ones count as "_other"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if isinstance(value, float) else str(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{name}="{_escape(value)}"' for name, value in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.bounds = buckets
        self.series: dict[tuple[str, ...], list[int]] = {}  # per label set: count per bucket, +Inf last
        self.sums: dict[tuple[str, ...], float] = {}

    def observe(self, key: tuple[str, ...], value: float) -> None:
        counts = self.series.setdefault(key, [0] * (len(self.bounds) + 1))
        slot = next((i for i, bound in enumerate(self.bounds) if value <= bound), len(self.bounds))
        counts[slot] += 1
        self.sums[key] = self.sums.get(key, 0.0) + value

    def lines(self, name: str, label_names: tuple[str, ...]) -> Iterable[str]:
        for key, counts in sorted(self.series.items()):
            cumulative = 0
            for bound, count in zip((*self.bounds, math.inf), counts, strict=True):
                cumulative += count
                le = 'le="' + _number(bound) + '"'
                yield f"{name}_bucket{_labels(label_names, key, le)} {cumulative}"
            yield f"{name}_sum{_labels(label_names, key)} {_number(self.sums[key])}"
            yield f"{name}_count{_labels(label_names, key)} {cumulative}"


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


class MetricsRegistry:
    REQUEST_LABELS = ("endpoint", "model", "status")
    TOKEN_LABELS = ("endpoint", "model")

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.lock = threading.Lock()  # observe_request may run on the event loop or in sync_to_async threads
        self.requests: dict[tuple[str, ...], int] = {}
        self.prompt_tokens: dict[tuple[str, ...], int] = {}
        self.generated_tokens: dict[tuple[str, ...], int] = {}
        self.latency = Histogram(LATENCY_BUCKETS_S)
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.events_dropped = 0
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
            key = (endpoint, model)
            self.requests[(*key, status)] = self.requests.get((*key, status), 0) + 1
            self.prompt_tokens[key] = self.prompt_tokens.get(key, 0) + max(0, int(prompt_tokens or 0))
            self.generated_tokens[key] = self.generated_tokens.get(key, 0) + max(0, int(completion_tokens or 0))
            if latency_s is not None:
                self.latency.observe(key, latency_s)
            if ttft_s is not None:
                self.ttft.observe(key, ttft_s)
            self.window.append((self.clock(), latency_s if latency_s is not None else math.nan, status == "error",
                                max(0, int(completion_tokens or 0))))

    def event_dropped(self, n: int = 1) -> None:
        with self.lock:
            self.events_dropped += max(0, int(n))

    def recent(self) -> RecentStats:
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
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> None:
            out.extend((f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples))

        def counter_lines(name: str, label_names: tuple[str, ...], values: dict) -> list[str]:
            return [f"{name}{_labels(label_names, key)} {value}" for key, value in sorted(values.items())]

        with self.lock:
            family("millm_requests_total", "counter", "Finished /v1 requests by endpoint, model and status.",
                   counter_lines("millm_requests_total", self.REQUEST_LABELS, self.requests))
            family("millm_prompt_tokens_total", "counter", "Prompt tokens of finished /v1 requests.",
                   counter_lines("millm_prompt_tokens_total", self.TOKEN_LABELS, self.prompt_tokens))
            family("millm_generated_tokens_total", "counter", "Tokens generated for finished /v1 requests.",
                   counter_lines("millm_generated_tokens_total", self.TOKEN_LABELS, self.generated_tokens))
            family("millm_request_latency_seconds", "histogram", "Time from request to last token.",
                   list(self.latency.lines("millm_request_latency_seconds", self.TOKEN_LABELS)))
            family("millm_time_to_first_token_seconds", "histogram", "Time from request to first generated token.",
                   list(self.ttft.lines("millm_time_to_first_token_seconds", self.TOKEN_LABELS)))
            family("millm_monitoring_events_dropped_total", "counter",
                   "Activation frames dropped by the live stream's throttle.", [
                       f"millm_monitoring_events_dropped_total {self.events_dropped}"])
        family("millm_inference_up", "gauge", "1 when an inference process answered the ping.",
               [f"millm_inference_up {1 if inference is not None else 0}"])
        if inference is not None:  # stale numbers from a dead process would mislead: leave them out
            for name, key, help_text in (
                ("millm_inference_queue_depth", "queue_depth", "Generations waiting for a batch slot."),
                ("millm_inference_active_requests", "active_requests", "Generations running now."),
                ("millm_inference_tokens_per_second", "tokens_per_second", "Recent generation throughput."),
                ("millm_inference_model_memory_bytes", "memory_bytes", "Memory held by the loaded model."),
            ):
                family(name, "gauge", help_text, [f"{name} {_number(inference.get(key) or 0)}"])
        if process_rss_bytes is not None:
            family("process_resident_memory_bytes", "gauge", "Resident memory of this web process.",
                   [f"process_resident_memory_bytes {process_rss_bytes}"])
        return "\n".join(out) + "\n"


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
