"""The health score: 100 minus a penalty per light (docs/operations.md), on hand-built checks."""

from __future__ import annotations

import pytest

from monitoring.alerts import Check, Thresholds, health_checks, health_score
from monitoring.metrics import RecentStats
from monitoring.system_status import system_status_build

THRESHOLDS = Thresholds(latency_p99_ms=1000.0, error_rate=0.1, memory_percent=90.0)
HOST = {"cpu_percent": 5.0, "memory_used_bytes": 1, "memory_total_bytes": 2, "memory_percent": 40.0,
        "process_rss_bytes": 1}


def score(*, latency=None, errors=0.0, memory=40.0, up=True) -> int:
    return health_score(health_checks(latency_p99_ms=latency, error_rate=errors, memory_percent=memory,
                                      inference_up=up, thresholds=THRESHOLDS))


@pytest.mark.parametrize("kwargs,expected", [
    ({}, 100),  # all green, no traffic
    ({"latency": 740.0, "memory": 67.0}, 100),  # green however close to yellow
    ({"latency": 750.0}, 90),  # yellow at 75 % of its threshold: 10
    ({"latency": 875.0}, 80),  # halfway through yellow: 10 + 20 * 0.5
    ({"latency": 999.0}, 70),  # just below red: 10 + 20 * 0.996 = 29.92 -> 70
    ({"latency": 1000.0}, 60),  # red: 40
    ({"latency": 5000.0, "errors": 0.5}, 20),  # two reds
    ({"latency": 5000.0, "errors": 0.5, "memory": 95.0}, 0),  # three reds: clamped at 0
    ({"errors": 0.09, "memory": 95.0}, 38),  # yellow error rate (10 + 20 * 0.6 = 22) and red memory (40)
    ({"up": False}, 0),  # nothing can be served
])
def test_score_from_the_lights(kwargs, expected):
    assert score(**kwargs) == expected


def test_the_score_only_falls_as_a_value_rises():
    scores = [score(latency=float(ms)) for ms in range(0, 2001, 25)]
    assert scores == sorted(scores, reverse=True) and scores[0] == 100 and scores[-1] == 60


def test_an_inference_light_alone_decides_nothing_else():
    assert health_score([Check("inference", 1.0, None, "green")]) == 100
    assert health_score([Check("inference", 0.0, None, "red"), Check("error_rate", 0.0, 0.1, "green")]) == 0


def test_the_status_payload_carries_the_score_beside_the_lights():
    recent = RecentStats(requests=10, errors=0, error_rate=0.0, latency_p50_ms=100.0, latency_p99_ms=875.0,
                         generated_tokens=5)
    status = system_status_build(host=HOST, pong={"pid": 1}, recent=recent, thresholds=THRESHOLDS)
    assert status["lights"]["latency_p99_ms"] == "yellow" and status["health_score"] == 80
    down = system_status_build(host=HOST, pong=None, recent=recent, thresholds=THRESHOLDS)
    assert down["health_score"] == 0
