"""Health lights from thresholds, alert cooldown (injected clock), the status payload and the publisher."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from monitoring.alerts import AlertTracker, Check, Thresholds, health_checks, light, worst_level
from monitoring.metrics import RecentStats
from monitoring.system_status import SystemPublisher, alert_message, system_status_build

THRESHOLDS = Thresholds(latency_p99_ms=1000.0, error_rate=0.1, memory_percent=90.0)
HOST = {"cpu_percent": 12.5, "memory_used_bytes": 6 * 2**30, "memory_total_bytes": 16 * 2**30,
        "memory_percent": 37.5, "process_rss_bytes": 200 * 2**20}
QUIET = RecentStats(requests=0, errors=0, error_rate=0.0, latency_p50_ms=None, latency_p99_ms=None,
                    generated_tokens=0)


@pytest.mark.parametrize("value,expected", [(None, "green"), (0.0, "green"), (74.9, "green"), (75.0, "yellow"),
                                            (99.9, "yellow"), (100.0, "red"), (500.0, "red")])
def test_light_is_yellow_from_three_quarters_and_red_at_the_threshold(value, expected):
    assert light(value, 100.0) == expected


def test_checks_and_the_worst_light():
    checks = health_checks(latency_p99_ms=800.0, error_rate=0.0, memory_percent=50.0, inference_up=True,
                           thresholds=THRESHOLDS)
    assert {c.kind: c.level for c in checks} == {"latency_p99_ms": "yellow", "error_rate": "green",
                                                 "memory_percent": "green", "inference": "green"}
    assert worst_level(checks) == "yellow"
    down = health_checks(latency_p99_ms=None, error_rate=0.0, memory_percent=10.0, inference_up=False,
                         thresholds=THRESHOLDS)
    assert worst_level(down) == "red"


def test_an_alert_repeats_only_after_its_cooldown_and_escalation_is_immediate():
    now = [0.0]
    tracker = AlertTracker(cooldown_s=60.0, clock=lambda: now[0])
    slow = Check("latency_p99_ms", 800.0, 1000.0, "yellow")
    calm = Check("error_rate", 0.0, 0.1, "green")
    assert tracker.due([slow, calm]) == [slow]
    now[0] = 30.0
    assert tracker.due([slow]) == []  # same kind and level within the cooldown
    worse = Check("latency_p99_ms", 1500.0, 1000.0, "red")
    assert tracker.due([worse]) == [worse]  # yellow -> red is news
    now[0] = 59.9
    assert tracker.due([slow, worse]) == []
    now[0] = 60.0
    assert tracker.due([slow]) == [slow]
    assert tracker.due([Check("memory_percent", 95.0, 90.0, "red")])  # other kinds have their own clock


def test_status_payload_from_its_inputs():
    recent = RecentStats(requests=20, errors=4, error_rate=0.2, latency_p50_ms=100.0, latency_p99_ms=400.0,
                         generated_tokens=300)
    pong = {"pid": 42, "loaded_model": "tiny", "queue_depth": 2, "active_requests": 1, "tokens_per_second": 55.0,
            "memory_bytes": 1000, "gpu": {"name": "H100", "allocated_bytes": 95, "total_bytes": 100}}
    status = system_status_build(host=HOST, pong=pong, recent=recent, thresholds=THRESHOLDS,
                                 now=datetime(2026, 1, 1, tzinfo=UTC))
    assert status["timestamp"] == "2026-01-01T00:00:00+00:00"
    assert (status["queue_depth"], status["active_requests"], status["tokens_per_second"]) == (2, 1, 55.0)
    assert status["inference"]["up"] is True and status["inference"]["loaded_model"] == "tiny"
    assert status["gpu"]["percent"] == 95.0
    assert status["lights"] == {"latency_p99_ms": "green", "error_rate": "red", "memory_percent": "red",
                                "inference": "green"}  # GPU memory counts towards the memory light
    assert status["worst"] == "red"
    no_inference = system_status_build(host=HOST, pong=None, recent=QUIET, thresholds=THRESHOLDS)
    assert no_inference["inference"] == {"up": False} and no_inference["gpu"] is None
    assert no_inference["lights"]["inference"] == "red" and no_inference["latency_p99_ms"] is None


def test_alert_messages_name_value_and_threshold():
    assert alert_message(Check("error_rate", 0.25, 0.1, "red")) == \
        "error rate 25% over the last minute (threshold 10%)"
    assert alert_message(Check("latency_p99_ms", 1234.0, 1000.0, "red")) == "p99 latency 1234 ms (threshold 1000 ms)"


def test_publisher_tick_publishes_status_then_alerts_once():
    published: list[tuple[str, str, dict]] = []

    async def publish(group, kind, payload):
        published.append((group, kind, payload))

    async def collect():
        return system_status_build(host={**HOST, "memory_percent": 95.0}, pong={"tokens_per_second": 7.0},
                                   recent=QUIET, thresholds=THRESHOLDS)

    now = [0.0]
    publisher = SystemPublisher(collect=collect, publish=publish,
                                tracker=AlertTracker(cooldown_s=10.0, clock=lambda: now[0]))

    async def two_ticks():
        await publisher.tick()
        await publisher.tick()

    asyncio.run(two_ticks())
    kinds = [kind for _, kind, _ in published]
    assert kinds == ["system_status", "alert", "system_status"]  # the memory alert is not repeated
    alert = published[1][2]
    assert (alert["kind"], alert["level"], alert["value"], alert["threshold"]) == ("memory_percent", "red", 95.0, 90.0)
    assert all(group == "system" for group, _, _ in published)
    assert publisher.last_status["throughput_history"] == [7.0, 7.0]
    assert list(publisher.alerts) == [alert]


def test_publisher_runs_while_someone_listens():
    ticks: list[float] = []

    async def collect():
        ticks.append(0)
        return system_status_build(host=HOST, pong={}, recent=QUIET, thresholds=THRESHOLDS)

    async def publish(group, kind, payload):
        pass

    publisher = SystemPublisher(collect=collect, publish=publish, interval_s=0.05,
                                tracker=AlertTracker(cooldown_s=60))

    async def scenario():
        publisher.join("a")
        publisher.join("b")
        first = publisher.task
        await asyncio.sleep(0.18)
        assert publisher.task is first  # one task per process, however many clients
        publisher.leave("a")
        assert publisher.running
        assert publisher.last_status is not None
        publisher.leave("b")
        assert not publisher.running and publisher.last_status is None
        count = len(ticks)
        await asyncio.sleep(0.12)
        return count

    count = asyncio.run(scenario())
    assert 3 <= count <= 5 and len(ticks) == count
