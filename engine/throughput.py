"""Throughput against memory over time, for tuning the batch size.

While a model is loaded, a daemon thread wakes every `interval_s` and, when the scheduler generated
anything since the last look (or still has rows running), keeps one sample:

    tokens_per_second = (tokens_total now - tokens_total then) / (seconds between the two looks)
    batch_size        = rows in the running batch at the look (max_batch_size is the cap)
    rss_bytes         = this process's resident memory; gpu_allocated_bytes = torch's allocation (None on CPU)

A bounded ring keeps the newest `capacity` samples; idle time adds none, so the ring keeps the last
busy minutes however long the server then idles. Reading the scheduler's status is a few attribute
reads under its lock: the generation loop does not notice the sampler.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch

from engine.scheduler import SchedulerStatus

DEFAULT_INTERVAL_S = 5.0
DEFAULT_CAPACITY = 120  # ten minutes of generation at the default interval


@dataclass(frozen=True)
class ThroughputSample:
    timestamp: float  # unix seconds at the end of the interval
    model: str | None
    interval_s: float
    tokens_per_second: float
    tokens: int  # generated during the interval
    batch_size: int
    max_batch_size: int
    queue_depth: int
    rss_bytes: int
    gpu_allocated_bytes: int | None


class ThroughputSampler:
    def __init__(self, read: Callable[[], tuple[str | None, SchedulerStatus] | None], *,
                 interval_s: float = DEFAULT_INTERVAL_S, capacity: int = DEFAULT_CAPACITY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.read = read  # (model name, scheduler status), or None when no model is loaded
        self.interval_s = interval_s
        self.clock = clock
        self.ring: deque[ThroughputSample] = deque(maxlen=capacity)
        self._last: tuple[float, int] | None = None  # (clock, tokens_total) at the previous look
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> ThroughputSample | None:
        """Look once; returns the sample kept, or None when nothing was generated since the last look."""
        reading = self.read()
        now = self.clock()
        if reading is None:
            self._last = None
            return None
        model, status = reading
        last, self._last = self._last, (now, status.tokens_total)
        if last is None:
            return None  # the first look only sets the baseline
        elapsed = now - last[0]
        # A new scheduler (another load) counts from zero again.
        tokens = status.tokens_total - last[1] if status.tokens_total >= last[1] else status.tokens_total
        if elapsed <= 0 or (tokens == 0 and status.active == 0):
            return None
        sample = ThroughputSample(
            timestamp=time.time(), model=model, interval_s=round(elapsed, 3),
            tokens_per_second=round(tokens / elapsed, 2), tokens=tokens, batch_size=status.active,
            max_batch_size=status.max_batch_size, queue_depth=status.queued,
            rss_bytes=psutil.Process().memory_info().rss,
            gpu_allocated_bytes=torch.cuda.memory_allocated() if torch.cuda.is_available() else None,
        )
        with self._lock:
            self.ring.append(sample)
        return sample

    def samples(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Newest first."""
        with self._lock:
            newest_first = list(reversed(self.ring))
        return [asdict(s) for s in newest_first[:limit]]

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._last = None
        self._thread = threading.Thread(target=self._run, name="millm-throughput", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # a failed look must not end the series (psutil on a busy /proc, say)
                continue
