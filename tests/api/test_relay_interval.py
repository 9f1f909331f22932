"""How often the inference process relays one request's streamed tokens: every 20 ms alone, less often
as more requests generate at once, so the whole process keeps to ~50 chunk messages a second."""

from __future__ import annotations

import json
import time

import pytest

from inference import handlers
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


@pytest.mark.django_db(transaction=True)
def test_a_request_that_finishes_during_a_chunk_pause_is_done_at_once(client, tiny_catalog, inference_worker,
                                                                      monkeypatch):
    """The pause between two chunks holds tokens back, never the end: the answer is complete as soon as
    the last token is generated (the test tier makes 40 tokens in well under a second)."""
    model, _ = tiny_catalog
    assert client.post(f"/api/models/{model.name}/load").status_code == 200
    monkeypatch.setattr(handlers, "CHUNK_INTERVAL_S", 3.0)
    monkeypatch.setattr(handlers, "CHUNK_INTERVAL_MAX_S", 3.0)
    body = {"model": model.name, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0,
            "ignore_eos": True}
    started = time.monotonic()
    response = client.post("/v1/completions", json.dumps(body), content_type="application/json")
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 40
    assert time.monotonic() - started < 2.0
