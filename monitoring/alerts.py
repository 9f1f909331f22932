"""Health lights (green/yellow/red) from configurable thresholds, and alerts with a cooldown.

A light is red at or past its threshold and yellow from WARN_FRACTION of it: yellow warns before the
limit is reached. Every yellow or red light raises an alert, but the same (kind, level) at most once
per cooldown, so a page stays readable while a condition lasts; a yellow turning red alerts at once.

The health score (0-100) sums the lights into one number (formula in `health_score`, docs/operations.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

from django.conf import settings

Level = Literal["green", "yellow", "red"]
LEVEL_RANK = {"green": 0, "yellow": 1, "red": 2}
WARN_FRACTION = 0.75


@dataclass(frozen=True)
class Thresholds:
    latency_p99_ms: float
    error_rate: float
    memory_percent: float

    @classmethod
    def from_settings(cls) -> Thresholds:
        return cls(latency_p99_ms=settings.ALERT_LATENCY_P99_MS, error_rate=settings.ALERT_ERROR_RATE,
                   memory_percent=settings.ALERT_MEMORY_PERCENT)


@dataclass(frozen=True)
class Check:
    kind: str  # latency_p99_ms, error_rate, memory_percent, inference
    value: float | None
    threshold: float | None
    level: Level

    def as_dict(self) -> dict:
        return asdict(self)


def light(value: float | None, threshold: float) -> Level:
    """No data (no request in the window) is green: nothing is wrong that we can see."""
    if value is None:
        return "green"
    if value >= threshold:
        return "red"
    return "yellow" if value >= WARN_FRACTION * threshold else "green"


def health_checks(*, latency_p99_ms: float | None, error_rate: float, memory_percent: float,
                  inference_up: bool, thresholds: Thresholds) -> list[Check]:
    return [
        Check("latency_p99_ms", latency_p99_ms, thresholds.latency_p99_ms,
              light(latency_p99_ms, thresholds.latency_p99_ms)),
        Check("error_rate", error_rate, thresholds.error_rate, light(error_rate, thresholds.error_rate)),
        Check("memory_percent", memory_percent, thresholds.memory_percent,
              light(memory_percent, thresholds.memory_percent)),
        Check("inference", 1.0 if inference_up else 0.0, None, "green" if inference_up else "red"),
    ]


RED_PENALTY = 40.0
YELLOW_PENALTY = (10.0, 30.0)  # at WARN_FRACTION of the threshold, and just below it


def health_score(checks: list[Check]) -> int:
    """100 minus a penalty per light; 0 when no inference process answers (nothing can be served).

    green: 0; red: RED_PENALTY; yellow: grows linearly from 10 at 75 % of its threshold to 30 just
    below it, so a yellow creeping toward red lowers the score before the light changes. Clamped at 0.
    """
    penalty = 0.0
    for check in checks:
        if check.kind == "inference" and check.level == "red":
            return 0
        if check.level == "red":
            penalty += RED_PENALTY
        elif check.level == "yellow" and check.value is not None and check.threshold:
            used = min(1.0, check.value / check.threshold)
            low, high = YELLOW_PENALTY
            penalty += low + (high - low) * (used - WARN_FRACTION) / (1.0 - WARN_FRACTION)
    return max(0, round(100 - penalty))


def worst_level(checks: list[Check]) -> Level:
    return max((c.level for c in checks), key=LEVEL_RANK.__getitem__, default="green")


class AlertTracker:
    def __init__(self, *, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.last_fired: dict[tuple[str, str], float] = {}

    def due(self, checks: list[Check]) -> list[Check]:
        """The non-green checks to announce now; marks them fired."""
        now = self.clock()
        fired = []
        for check in checks:
            if check.level == "green":
                continue
            key = (check.kind, check.level)
            last = self.last_fired.get(key)
            if last is None or now - last >= self.cooldown_s:
                self.last_fired[key] = now
                fired.append(check)
        return fired
