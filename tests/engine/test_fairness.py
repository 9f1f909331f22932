"""Bounded work on the tiny test-tier model: embeddings run in pieces between decode steps (a chat
is not held up by a long embedding), a per-request embedding token limit, embeddings dropped on
timeout, the server-side max_tokens default and ceiling, and oversized prompts refused before tokenizing."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.embeddings import embed
from engine.errors import SchedulerUnavailableError
from engine.generation import FinishEvent, GenerationRequest
from engine.loading import load_model
from engine.runtime import EngineRuntime
from engine.sampling import InvalidRequestError, SamplingParams
from engine.scheduler import GenerationScheduler

TIMEOUT_S = 120
LONG = " ".join(["the cat sat on the mat and looked at the dog"] * 90)  # ~1,000 tokens on the tiny model


@pytest.fixture(scope="module")
def tiny(test_tier_assets):
    torch.set_num_threads(1)
    return load_model(test_tier_assets.model.local_path)


def long_ids(tiny, n: int) -> list[int]:
    ids = list(tiny.tokenizer(LONG)["input_ids"])
    assert len(ids) >= n
    return ids[:n]


def finish_of(handle) -> FinishEvent:
    while True:
        event = handle.get(timeout=TIMEOUT_S)
        if isinstance(event, FinishEvent):
            return event


def test_a_long_input_embedded_in_pieces_equals_the_whole_forward_pass(tiny):
    texts = [long_ids(tiny, 1000), [5, 6, 7], long_ids(tiny, 300)]
    whole = embed(tiny, texts)
    scheduler = GenerationScheduler(tiny, embed_piece_tokens=64).start()
    try:
        pieces = scheduler.embed(texts)
    finally:
        scheduler.stop()
    assert pieces.token_counts == whole.token_counts == [1000, 3, 300]
    for a, b in zip(pieces.embeddings, whole.embeddings, strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)


def test_a_chat_is_not_held_up_by_a_long_embedding(tiny):
    """Before: the whole embedding ran as one call on the loop thread and the chat waited for all of it."""
    scheduler = GenerationScheduler(tiny, embed_piece_tokens=32).start()
    done: dict[str, float] = {}
    try:
        start = time.monotonic()
        texts = [long_ids(tiny, 1000), long_ids(tiny, 1000)]  # ~63 pieces of 32 tokens

        def embedding():
            scheduler.embed(texts)
            done["embedding"] = time.monotonic() - start

        worker = threading.Thread(target=embedding)
        worker.start()
        time.sleep(0.05)  # the embedding is under way
        handle = scheduler.submit(GenerationRequest("Hello", SamplingParams(max_tokens=8, ignore_eos=True)))
        finish = finish_of(handle)
        done["chat"] = time.monotonic() - start
        worker.join(TIMEOUT_S)
    finally:
        scheduler.stop()
    assert finish.finish_reason == "length" and finish.usage.completion_tokens == 8
    assert done["chat"] < done["embedding"], done
    print(f"\nchat done after {done['chat']:.2f}s, the embedding after {done['embedding']:.2f}s")


def test_an_embedding_request_over_the_token_limit_is_refused_whole(tiny):
    scheduler = GenerationScheduler(tiny, max_embed_tokens=500).start()
    try:
        with pytest.raises(InvalidRequestError) as caught:
            scheduler.embed([long_ids(tiny, 300), long_ids(tiny, 300)])
        assert caught.value.status == 400 and caught.value.param == "input"
        assert "600 tokens" in caught.value.message and "500" in caught.value.message
        assert len(scheduler.embed([long_ids(tiny, 300)]).embeddings) == 1  # within the limit: served
    finally:
        scheduler.stop()


def test_an_embedding_past_its_timeout_is_dropped_and_generation_goes_on(tiny):
    scheduler = GenerationScheduler(tiny, embed_piece_tokens=8).start()
    try:
        with pytest.raises(SchedulerUnavailableError):
            scheduler.embed([long_ids(tiny, 1000)] * 4, timeout_s=0.05)
        deadline = time.monotonic() + 5
        while scheduler._embeds and time.monotonic() < deadline:  # dropped before its next piece
            time.sleep(0.01)
        assert not scheduler._embeds
        finish = finish_of(scheduler.submit(GenerationRequest("Hi", SamplingParams(max_tokens=3, ignore_eos=True))))
        assert finish.finish_reason == "length"
    finally:
        scheduler.stop()


def test_max_tokens_has_a_server_default_and_ceiling(tiny):
    """Before: max_tokens null meant the whole context (1,024 tokens here, 8,192 on the demo)."""
    scheduler = GenerationScheduler(tiny, max_tokens_default=6).start()
    try:
        finish = finish_of(scheduler.submit(GenerationRequest("Hello", SamplingParams(ignore_eos=True))))
        assert (finish.finish_reason, finish.usage.completion_tokens) == ("length", 6)
        with pytest.raises(InvalidRequestError) as caught:
            scheduler.submit(GenerationRequest("Hello", SamplingParams(max_tokens=7)))
        assert caught.value.param == "max_tokens" and "MILLM_MAX_TOKENS_DEFAULT" in caught.value.message
    finally:
        scheduler.stop()


def test_an_oversized_prompt_is_refused_before_tokenizing(test_tier_assets):
    """A 2.4 MB prompt took seconds to tokenize (on the inference loop) before it was refused."""
    runtime = EngineRuntime(torch_threads=1, max_prompt_bytes=1024 * 1024)
    runtime.load(name="tiny", path=test_tier_assets.model.local_path)
    try:
        started = time.monotonic()
        with pytest.raises(InvalidRequestError) as caught:
            runtime.submit(request_id="big", model=None, prompt="é " * 800_000, messages=None, params={},
                           steering=None)
        refused_s = time.monotonic() - started
        assert caught.value.param == "prompt" and "2400000 bytes" in caught.value.message
        assert "MILLM_MAX_PROMPT_BYTES" in caught.value.message
        assert refused_s < 0.5, refused_s  # no tokenizing
        with pytest.raises(InvalidRequestError) as caught:
            runtime.submit(request_id="big-chat", model=None, prompt=None, params={}, steering=None,
                           messages=[{"role": "user", "content": [{"type": "text", "text": "x" * 1_100_000}]}])
        assert caught.value.param == "messages"
        submitted = runtime.submit(request_id="ok", model=None, prompt="Hello", messages=None,
                                   params={"max_tokens": 2}, steering=None)
        assert finish_of(submitted.handle).finish_reason in ("length", "stop")
    finally:
        runtime.unload()
