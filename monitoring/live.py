"""The live activation stream: per-token frames from running requests to `/ws/monitor/`, throttled.

At most MILLM_MONITOR_MAX_HZ `activation_update` events per second leave each web process; frames
that arrive in between ride in the next event, and past MAX_FRAMES_PER_EVENT the oldest are
dropped (and counted), so a fast model can never flood the pages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings

from millm_site.events import event_publish

MAX_FRAMES_PER_EVENT = 256
LABEL_CACHE_S = 10.0


class ActivationPublisher:
    def __init__(self, *, max_hz: float, publish=None, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 1.0 / max_hz
        self.publish = publish or (lambda payload: event_publish("monitoring", "activation_update", payload))
        self.clock = clock
        self.pending: list[dict[str, Any]] = []
        self.last_sent = -float("inf")
        self._timer: asyncio.TimerHandle | None = None
        self._lock = asyncio.Lock()

    async def offer(self, frames: list[dict[str, Any]]) -> None:
        self.pending.extend(frames)
        overflow = len(self.pending) - MAX_FRAMES_PER_EVENT
        if overflow > 0:
            del self.pending[:overflow]
            _count_dropped(overflow)
        wait = self.last_sent + self.interval - self.clock()
        if wait <= 0:
            await self.flush()
        elif self._timer is None:
            self._schedule(wait)

    def _schedule(self, wait: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(wait, lambda: asyncio.ensure_future(self.flush()))

    async def flush(self) -> None:
        async with self._lock:
            self._timer = None
            if not self.pending:
                return
            wait = self.last_sent + self.interval - self.clock()
            if wait > 0:  # the loop's timer fired before the interval by our clock: held frames need a next try
                self._schedule(wait)
                return
            frames, self.pending = self.pending, []
            self.last_sent = self.clock()
            timestamp = time.time()  # the moment the throttle let this event go
        by_sae = await feature_labels()
        for frame in frames:  # a frame naming its SAE (`sae`) gets that SAE's labels, else the default SAE's
            labels = by_sae.get(frame.get("sae")) or by_sae.get(None) or {}
            frame["labels"] = {index: labels[int(index)] for index in frame["features"] if int(index) in labels}
        await self.publish({"timestamp": timestamp, "frames": frames})


def _count_dropped(n: int) -> None:
    try:
        from monitoring.metrics import monitoring_event_dropped
    except ImportError:  # metrics not wired in this build
        return
    monitoring_event_dropped(n=n)


_labels: dict[str | None, dict[int, str]] = {}
_labels_read_at = -float("inf")


async def feature_labels() -> dict[str | None, dict[int, str]]:
    """Labels of each attached SAE by name (None: the default SAE's, whose features a frame without `sae`
    holds; several SAEs share indices), re-read at most every LABEL_CACHE_S (relabels show up soon enough)."""
    global _labels, _labels_read_at
    if time.monotonic() - _labels_read_at > LABEL_CACHE_S:
        from steering.sae_addressing import attached_saes_in_order

        def read() -> dict[str | None, dict[int, str]]:
            saes = attached_saes_in_order()
            found: dict[str | None, dict[int, str]] = {
                name: dict(sae.labels.values_list("index", "label")) for name, sae in saes.items()}
            found[None] = next(iter(found.values()), {})
            return found

        _labels = await sync_to_async(read)()
        _labels_read_at = time.monotonic()
    return _labels


_publisher: ActivationPublisher | None = None


def activation_publisher() -> ActivationPublisher:
    """One per web process (and event loop, which daphne has exactly one of)."""
    global _publisher
    if _publisher is None:
        _publisher = ActivationPublisher(max_hz=settings.MONITOR_MAX_HZ)
    return _publisher
