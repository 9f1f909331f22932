"""The /ws/system/ feed: a `system_status` event every MILLM_SYSTEM_INTERVAL seconds, and `alert` events.

One publisher task per web process, started by the first SystemConsumer to connect and cancelled when
the last one leaves, so an idle server pings nothing. It publishes to the `system` group; with several
web processes each one with clients publishes its own figures (metrics are per process).
The web process never imports torch: GPU figures come from the inference process's ping, when it
reports them (`gpu: {name, allocated_bytes, total_bytes}`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import psutil
import structlog
from django.conf import settings

from inference import registry
from inference.client import inference_client
from millm_site.errors import InferenceUnavailable, MillmError
from millm_site.events import event_publish
from monitoring.alerts import AlertTracker, Check, Thresholds, health_checks, health_score, worst_level
from monitoring.metrics import RecentStats, recent_stats

log = structlog.get_logger("millm.system")

THROUGHPUT_POINTS = 60  # samples kept for the sparkline (2 minutes at the default interval)
RECENT_ALERTS = 20
Publish = Callable[[str, str, dict[str, Any]], Awaitable[None]]


async def inference_ping(*, timeout: float) -> dict[str, Any] | None:
    """The inference process's status (`ping`), or None when none answers in time."""
    try:
        pong = await inference_client().ping(timeout=timeout)
    except MillmError:
        return None
    return pong.model_dump(exclude={"type"})


async def throughput_samples(*, limit: int) -> list[dict[str, Any]]:
    """The inference process's throughput-versus-memory samples, newest first (engine/throughput.py)."""
    pong = await inference_ping(timeout=settings.INFERENCE_TIMEOUT_S)
    if pong is None:
        raise InferenceUnavailable("No inference process answered: no throughput samples to show")
    return list(pong.get("throughput_samples") or [])[:limit]


def host_snapshot() -> dict[str, Any]:
    memory = psutil.virtual_memory()
    return {"cpu_percent": psutil.cpu_percent(interval=None),  # since the previous call: no blocking sample
            "memory_used_bytes": memory.total - memory.available, "memory_total_bytes": memory.total,
            "memory_percent": memory.percent, "process_rss_bytes": psutil.Process().memory_info().rss}


def _gpu(pong: dict[str, Any] | None) -> dict[str, Any] | None:
    gpu = (pong or {}).get("gpu")
    if not isinstance(gpu, dict) or not gpu.get("total_bytes"):
        return None
    allocated, total = int(gpu.get("allocated_bytes") or 0), int(gpu["total_bytes"])
    return {"name": str(gpu.get("name", "")), "allocated_bytes": allocated, "total_bytes": total,
            "percent": round(100 * allocated / total, 1)}


def system_status_build(*, host: dict[str, Any], pong: dict[str, Any] | None, recent: RecentStats,
                        thresholds: Thresholds, now: datetime | None = None) -> dict[str, Any]:
    """One `system_status` payload from its inputs (pure, so tests can feed any situation)."""
    gpu = _gpu(pong)
    memory_percent = max(host["memory_percent"], gpu["percent"] if gpu else 0.0)
    checks = health_checks(latency_p99_ms=recent.latency_p99_ms, error_rate=recent.error_rate,
                           memory_percent=memory_percent, inference_up=pong is not None, thresholds=thresholds)
    inference = {"up": pong is not None}
    if pong is not None:
        inference.update({key: pong.get(key) for key in ("pid", "loaded_model", "attached_sae", "attached_saes", "queue_depth",
                                                         "active_requests", "memory_bytes")})
    return {
        "timestamp": (now or datetime.now(UTC)).isoformat(),
        "cpu_percent": host["cpu_percent"],
        "memory": {"used_bytes": host["memory_used_bytes"], "total_bytes": host["memory_total_bytes"],
                   "percent": host["memory_percent"]},
        "process_rss_bytes": host["process_rss_bytes"],
        "gpu": gpu,
        "inference": inference,
        "tokens_per_second": float((pong or {}).get("tokens_per_second") or 0.0),
        "queue_depth": int((pong or {}).get("queue_depth") or 0),
        "active_requests": int((pong or {}).get("active_requests") or 0),
        "requests_last_minute": recent.requests,
        "latency_p50_ms": recent.latency_p50_ms,
        "latency_p99_ms": recent.latency_p99_ms,
        "error_rate": recent.error_rate,
        "lights": {check.kind: check.level for check in checks},
        "checks": [check.as_dict() for check in checks],
        "worst": worst_level(checks),
        "health_score": health_score(checks),
    }


def alert_message(check: Check) -> str:
    if check.kind == "latency_p99_ms":
        return f"p99 latency {check.value:.0f} ms (threshold {check.threshold:.0f} ms)"
    if check.kind == "error_rate":
        return f"error rate {check.value:.0%} over the last minute (threshold {check.threshold:.0%})"
    if check.kind == "memory_percent":
        return f"memory {check.value:.0f}% used (threshold {check.threshold:.0f}%)"
    return "no inference process answers"


async def system_status_collect() -> dict[str, Any]:
    interval = settings.SYSTEM_INTERVAL_S
    # Bounded by the interval, so a dead inference process does not slow the feed down.
    pong = await inference_ping(timeout=max(0.2, min(settings.INFERENCE_TIMEOUT_S, 0.75 * interval)))
    status = system_status_build(host=host_snapshot(), pong=pong, recent=recent_stats(),
                                 thresholds=Thresholds.from_settings())
    return {**status, "processes": await registry.processes_summary()}


class SystemPublisher:
    def __init__(self, *, collect: Callable[[], Awaitable[dict[str, Any]]] = system_status_collect,
                 publish: Publish = event_publish, tracker: AlertTracker | None = None,
                 interval_s: float | None = None) -> None:
        self.collect = collect
        self.publish = publish
        self.tracker = tracker
        self.interval_s = interval_s  # None: settings.SYSTEM_INTERVAL_S, read every tick
        self.members: set[str] = set()
        self.task: asyncio.Task | None = None
        self.last_status: dict[str, Any] | None = None
        self.throughput: deque[float] = deque(maxlen=THROUGHPUT_POINTS)
        self.alerts: deque[dict[str, Any]] = deque(maxlen=RECENT_ALERTS)

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def join(self, channel_name: str) -> None:
        self.members.add(channel_name)
        loop = asyncio.get_running_loop()
        # A task left on another (closed) loop cannot run again: start a fresh one on this loop.
        if not self.running or self.task.get_loop() is not loop:
            self.task = loop.create_task(self._run(), name="millm-system-status")

    def leave(self, channel_name: str) -> None:
        self.members.discard(channel_name)
        if not self.members and self.task is not None:
            self.task.cancel()
            self.task = None
            # The next client must not be shown old numbers, nor a sparkline with a hidden gap in time.
            self.last_status = None
            self.throughput.clear()

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.tick()
            except Exception:  # a broken tick (Redis blip) must not end the feed
                log.exception("system_status_failed")
            interval = self.interval_s if self.interval_s is not None else settings.SYSTEM_INTERVAL_S
            await asyncio.sleep(max(0.05, interval - (time.monotonic() - started)))

    async def tick(self) -> dict[str, Any]:
        status = await self.collect()
        self.throughput.append(status["tokens_per_second"])
        status["throughput_history"] = list(self.throughput)
        self.last_status = status
        await self.publish("system", "system_status", status)
        if self.tracker is None:
            self.tracker = AlertTracker(cooldown_s=settings.ALERT_COOLDOWN_S)
        checks = [Check(**c) for c in status["checks"]]
        for check in self.tracker.due(checks):
            alert = {**check.as_dict(), "message": alert_message(check), "timestamp": status["timestamp"]}
            log.warning("system_alert", **alert)
            self.alerts.appendleft(alert)
            await self.publish("system", "alert", alert)
        return status


system_publisher = SystemPublisher()
