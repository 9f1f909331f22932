"""How often the inference process relays one request's streamed tokens: every 20 ms alone, less often
as more requests generate at once, so the whole process keeps to ~50 chunk messages a second."""

from __future__ import annotations

import pytest

from inference.handlers import CHUNK_INTERVAL_MAX_S, CHUNK_INTERVAL_S, RELAY_MESSAGES_PER_S, chunk_interval


@pytest.mark.parametrize("generating,interval", [(0, 0.02), (1, 0.02), (2, 0.04), (8, 0.16), (12, 0.24),
                                                 (13, 0.25), (64, 0.25)])
def test_the_interval_grows_with_the_requests_generating_up_to_a_quarter_second(generating, interval):
    assert chunk_interval(generating) == pytest.approx(interval)


def test_the_process_keeps_to_its_message_rate_however_many_requests_stream():
    for generating in range(1, 13):
        messages_per_s = generating / chunk_interval(generating)
        assert messages_per_s <= RELAY_MESSAGES_PER_S + 1e-9
    assert chunk_interval(1) == CHUNK_INTERVAL_S and chunk_interval(1000) == CHUNK_INTERVAL_MAX_S
