"""Orphaned generations: the inference process cancels a generation whose requester stopped renewing
its lease (web process gone, request given up with a 503) instead of running it out with nobody
listening; a requester that listens (inference/generation_stream.generate) keeps it alive."""

from __future__ import annotations

import asyncio
import time

import pytest
from django.conf import settings

from inference import generation_stream
from inference import messages as m
from inference.client import InferenceClient
from millm_site.channel_layer import OneTripRedisChannelLayer

pytestmark = pytest.mark.django_db(transaction=True)

LONG = {"max_tokens": 1000, "ignore_eos": True, "temperature": 0}


def new_layer() -> OneTripRedisChannelLayer:
    return OneTripRedisChannelLayer(**settings.CHANNEL_LAYERS["default"]["CONFIG"])


async def ask(layer, call: m.Message, timeout: float = 60) -> dict:
    reply_channel = await layer.new_channel()
    await layer.send(settings.INFERENCE_CHANNEL, {**call.model_dump(), "reply_channel": reply_channel})
    return await asyncio.wait_for(layer.receive(reply_channel), timeout)


async def run_unrenewed(lease_s: float | None) -> tuple[dict, float, int]:
    """A generation whose requester reads its replies but never renews the lease."""
    layer = new_layer()
    loaded = await ask(layer, m.LoadModel(model="tiny-llama"))
    assert loaded["type"] == "loaded", loaded
    reply_channel = await layer.new_channel()
    call = m.Generate(request_id=f"orphan-{lease_s}", prompt="Once upon a time", params=LONG, lease_s=lease_s)
    started = time.monotonic()
    await layer.send(settings.INFERENCE_CHANNEL, {**call.model_dump(), "reply_channel": reply_channel})
    tokens = 0
    while True:
        reply = await asyncio.wait_for(layer.receive(reply_channel), 120)
        if reply["type"] == "chunk":
            tokens += len(reply["tokens"])
        if reply["type"] in ("done", "error"):
            return reply, time.monotonic() - started, tokens


def test_a_generation_nobody_renews_is_cancelled_within_its_lease(inference_worker, tiny_catalog):
    """Before: no lease; the generation ran all its 1,000 tokens with nobody listening."""
    done, elapsed_s, tokens = asyncio.run(run_unrenewed(lease_s=0.5))
    assert done["type"] == "done" and done["finish_reason"] == "cancelled", done
    assert tokens < 1000 and elapsed_s < 5, (tokens, elapsed_s)
    print(f"\norphan cancelled after {elapsed_s:.2f}s and {tokens} tokens")


def test_a_listening_requester_keeps_its_generation_alive(inference_worker, tiny_catalog, monkeypatch):
    monkeypatch.setattr(generation_stream, "LEASE_S", 0.6)
    monkeypatch.setattr(generation_stream, "LEASE_RENEW_S", 0.2)

    async def run():
        loaded = await ask(new_layer(), m.LoadModel(model="tiny-llama"))
        assert loaded["type"] == "loaded", loaded
        started = time.monotonic()
        result = await generation_stream.collect(generation_stream.generate(
            model="tiny-llama", prompt="Once upon a time", messages=None, params=LONG, steering=None,
            client=InferenceClient()))
        return result, time.monotonic() - started

    result, elapsed_s = asyncio.run(run())
    assert (result.finish_reason, result.completion_tokens) == ("length", 1000)
    assert elapsed_s > 0.6  # it outlived several leases: the renewals kept it


def test_a_generation_the_inference_process_stops_is_a_503_not_a_short_answer(inference_worker, tiny_catalog):
    """Before: the model unloaded (or the inference process shutting down) mid-generation gave the waiting
    client a 200 with a cut answer and finish_reason "cancelled" (CI: 218 of 900 tokens at SIGTERM)."""
    from millm_site.errors import InferenceUnavailable

    async def run():
        loaded = await ask(new_layer(), m.LoadModel(model="tiny-llama"))
        assert loaded["type"] == "loaded", loaded
        seen = []

        class Watch:
            request_id, params, steering, prompt = "", {}, None, ""

            def see(self, raw):
                seen.append(raw["type"])

            async def finish(self, status, message=""):
                seen.append(("finish", status, message))

        generating = asyncio.ensure_future(generation_stream.collect(generation_stream.generate(
            model="tiny-llama", prompt="Once upon a time", messages=None, params=LONG, steering=None,
            client=InferenceClient(), observer=Watch())))
        deadline = time.monotonic() + 60
        while "chunk" not in seen and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert "chunk" in seen, seen
        unloaded = await ask(new_layer(), m.UnloadModel(model="tiny-llama"))
        assert unloaded["type"] != "error", unloaded
        with pytest.raises(InferenceUnavailable, match="stopped this generation"):
            await asyncio.wait_for(generating, 60)
        return seen

    seen = asyncio.run(run())
    assert ("finish", "error", "the inference process stopped the generation") in seen, seen
