"""The live activation stream's throttle (monitoring/live.py): frames never wait for a next request."""

from __future__ import annotations

import asyncio

import pytest

from monitoring import live


@pytest.fixture(autouse=True)
def no_labels(monkeypatch):
    async def labels():
        return {}

    monkeypatch.setattr(live, "feature_labels", labels)


def _frames(sent: list[dict]) -> list[int]:
    return [frame["id"] for payload in sent for frame in payload["frames"]]


def test_frames_offered_within_the_interval_go_out_with_the_next_event():
    async def scenario():
        sent: list[dict] = []

        async def publish(payload):
            sent.append(payload)

        publisher = live.ActivationPublisher(max_hz=20, publish=publish)
        await publisher.offer([{"id": 1, "features": []}])
        await publisher.offer([{"id": 2, "features": []}, {"id": 3, "features": []}])
        assert _frames(sent) == [1]  # within 50 ms of the first event: held
        await asyncio.sleep(0.5)  # the timer is due in 50 ms; slack for a loaded machine
        assert _frames(sent) == [1, 2, 3] and len(sent) == 2

    asyncio.run(scenario())


def test_a_timer_that_fires_before_the_interval_by_the_throttles_clock_tries_again():
    # The event loop's timer and the throttle's clock may disagree by a rounding: a flush that finds the
    # interval not yet over must schedule itself again, or the held frames (a request's last tokens) wait
    # for the next request's to leave — the Monitor showed nothing after a request until then.
    async def scenario():
        now = [100.0]
        sent: list[dict] = []

        async def publish(payload):
            sent.append(payload)

        publisher = live.ActivationPublisher(max_hz=10, publish=publish, clock=lambda: now[0])
        await publisher.offer([{"id": 1, "features": []}])
        now[0] = 100.01
        await publisher.offer([{"id": 2, "features": []}])  # held: the timer is due in 90 ms
        await asyncio.sleep(0.15)  # it fires while the throttle's clock still says 10 ms
        assert _frames(sent) == [1]
        now[0] = 100.5
        await asyncio.sleep(0.5)  # a retry is due 90 ms after that early one
        assert _frames(sent) == [1, 2]

    asyncio.run(scenario())
