"""Chunked prefill on the tiny test-tier model: a long prompt is prefilled a chunk per scheduler
iteration, so a short request that arrives meanwhile gets its first token within a few chunks' time,
and greedy output is the same as with the prompt prefilled in one pass."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import DynamicCache

from engine.generation import FinishEvent, GenerationRequest, TokenEvent
from engine.loading import load_model
from engine.request_features import FeatureRequest
from engine.runtime import EngineRuntime
from engine.sampling import SamplingParams
from engine.scheduler import GenerationScheduler
from engine.steering import SteeringFeature, SteeringSpec

TIMEOUT_S = 120
CHUNK = 64
LONG = " ".join(["the cat sat on the mat and looked at the dog"] * 90)  # ~1,000 tokens on the tiny model


@pytest.fixture(scope="module")
def tiny(test_tier_assets):
    torch.set_num_threads(1)
    return load_model(test_tier_assets.model.local_path)


def long_prompt(tiny, n: int) -> list[int]:
    ids = list(tiny.tokenizer(LONG)["input_ids"])
    assert len(ids) >= n
    return ids[:n]


def run(handle) -> tuple[list[int], FinishEvent]:
    tokens = []
    while True:
        event = handle.get(timeout=TIMEOUT_S)
        if isinstance(event, FinishEvent):
            return tokens, event
        tokens.append(event.token_id)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_greedy_output_is_the_same_chunked_and_in_one_pass(tiny):
    prompt = long_prompt(tiny, 1000)
    outputs = {}
    for chunk in (CHUNK, 4096):
        scheduler = GenerationScheduler(tiny, prefill_chunk_tokens=chunk, first_chunk_tokens=chunk).start()
        try:
            # A short request alongside: it joins the batch while the long one is still prefilling.
            long_handle = scheduler.submit(GenerationRequest(prompt, greedy(16)))
            short_handle = scheduler.submit(GenerationRequest("The cat", greedy(16)))
            outputs[chunk] = (run(long_handle)[0], run(short_handle)[0])
        finally:
            scheduler.stop()
    assert outputs[CHUNK] == outputs[4096]
    assert len(outputs[CHUNK][0]) == 16


def prefill_seconds(tiny, context: int) -> tuple[float, float]:
    """(the whole `context`-token prompt in one pass, its last CHUNK tokens after the rest: the slowest
    chunk), best of three."""
    ids = torch.tensor([long_prompt(tiny, context)])
    whole = chunk = float("inf")
    with torch.no_grad():
        for _ in range(3):
            started = time.perf_counter()
            tiny.model(ids, past_key_values=DynamicCache(config=tiny.model.config), use_cache=True)
            whole = min(whole, time.perf_counter() - started)
            cache = DynamicCache(config=tiny.model.config)
            tiny.model(ids[:, :-CHUNK], past_key_values=cache, use_cache=True)
            started = time.perf_counter()
            tiny.model(ids[:, -CHUNK:], past_key_values=cache, use_cache=True)
            chunk = min(chunk, time.perf_counter() - started)
    return whole, chunk


def test_a_short_request_starts_within_a_few_chunks_while_a_long_prompt_prefills(tiny):
    context = tiny.context_length - 24
    whole_s, one_chunk_s = prefill_seconds(tiny, context)
    scheduler = GenerationScheduler(tiny, prefill_chunk_tokens=CHUNK, first_chunk_tokens=CHUNK).start()
    try:
        long_handle = scheduler.submit(GenerationRequest(long_prompt(tiny, context), greedy(4)))
        time.sleep(0.01)  # the long prefill is under way
        short_handle = scheduler.submit(GenerationRequest("Hello", greedy(1)))
        _, short = run(short_handle)
        _, long = run(long_handle)
    finally:
        scheduler.stop()
    short_first = short.timings.first_token_s
    long_first = long.timings.first_token_s
    print(f"\n{context}-token prefill in one pass: {whole_s * 1000:.1f} ms, its last {CHUNK}-token chunk: "
          f"{one_chunk_s * 1000:.1f} ms; short request's first token after {short_first * 1000:.1f} ms; the long "
          f"prompt's after {long_first * 1000:.1f} ms")
    assert short_first < long_first
    # Unchunked, the short request waits for the whole prefill.
    assert short_first < min(4 * one_chunk_s + 0.02, whole_s / 2)


def test_monitoring_and_returned_features_are_the_same_chunked_and_in_one_pass(test_tier_assets):
    """The chunks' captures are joined: prompt frames keep their positions 0..n-1 across chunks."""
    runtime = EngineRuntime(torch_threads=1)
    runtime.load(name="tiny", path=str(test_tier_assets.model.local_path))
    runtime.attach_sae(name="sae", path=str(test_tier_assets.sae.local_path))
    runtime.configure_monitoring(enabled=True, top_k=3, features=[7])
    steering = SteeringSpec(features=(SteeringFeature(7, 40.0),))
    results = {}
    prompt_tokens = len(runtime.loaded.tokenizer("The cat sat on the mat")["input_ids"])
    try:
        for chunk in (3, 4096):
            runtime.scheduler.prefill_chunk_tokens = runtime.scheduler._chunk_tokens = chunk
            submitted = runtime.submit(request_id=f"chunk-{chunk}", model=None, prompt="The cat sat on the mat",
                                       messages=None, params={"max_tokens": 4, "temperature": 0.0},
                                       steering=steering, features=FeatureRequest(top_k=5, after_steering=True))
            ids, returned, monitored = [], [], []
            for event in submitted.handle:
                if isinstance(event, TokenEvent):
                    ids.append(event.token_id)
                    returned += submitted.features.frames(event.token_id, event.captures)
                    monitored += submitted.frames.frames(event.token_id, event.captures)
            results[chunk] = (ids, returned, monitored)
    finally:
        runtime.unload()
    assert prompt_tokens > 3  # it really ran in chunks
    chunked, whole = results[3], results[4096]
    assert chunked[0] == whole[0]
    for mine, theirs in ((chunked[1], whole[1]), (chunked[2], whole[2])):
        assert [(f["position"], f["type"], f["token_id"]) for f in mine] == \
            [(f["position"], f["type"], f["token_id"]) for f in theirs]
        assert sum(f["type"] == "prompt" for f in mine) == prompt_tokens
        for a, b in zip(mine, theirs, strict=True):
            assert a["features"].keys() == b["features"].keys(), (a, b)
            for key, value in b["features"].items():
                assert a["features"][key] == pytest.approx(value, abs=2e-4)



def worst_gap_while_prefilling(tiny, context: int) -> float:
    """The longest wait between a running stream's tokens while a `context`-token prompt prefills."""
    prompt = long_prompt(tiny, context)  # tokenized first: the reader must keep up with the stream
    scheduler = GenerationScheduler(tiny, prefill_chunk_tokens=CHUNK, first_chunk_tokens=CHUNK).start()
    arrivals = []
    try:
        running = scheduler.submit(GenerationRequest("Once upon a time", greedy(120)))
        for _ in range(10):  # the stream is decoding
            running.get(timeout=TIMEOUT_S)
        long_handle = scheduler.submit(GenerationRequest(prompt, greedy(2)))
        while True:
            event = running.get(timeout=TIMEOUT_S)
            arrivals.append(time.monotonic())
            if isinstance(event, FinishEvent):
                break
        _, long = run(long_handle)
    finally:
        scheduler.stop()
    assert long.finish_reason == "length"
    return max(b - a for a, b in zip(arrivals, arrivals[1:], strict=False))


def test_a_running_stream_keeps_its_pace_while_a_long_prompt_prefills(tiny):
    """Unchunked, one gap is at least the whole prefill. Best of three runs: the CPU is shared."""
    context = tiny.context_length - 24
    whole_s, one_chunk_s = prefill_seconds(tiny, context)
    gaps = [worst_gap_while_prefilling(tiny, context) for _ in range(3)]
    print(f"\nworst gap between a running stream's tokens while a {context}-token prompt prefilled: "
          f"{', '.join(f'{g * 1000:.1f}' for g in gaps)} ms (one-pass prefill {whole_s * 1000:.1f} ms, "
          f"one {CHUNK}-token chunk {one_chunk_s * 1000:.1f} ms)")
    assert min(gaps) < min(3 * one_chunk_s + 0.01, whole_s * 0.75)


def test_a_prompt_being_chunked_holds_its_batch_slot(tiny):
    """max_batch_size 1: the short request queued behind the long one waits for it, chunked or not."""
    scheduler = GenerationScheduler(tiny, max_batch_size=1, prefill_chunk_tokens=CHUNK, first_chunk_tokens=CHUNK)
    long_handle = scheduler.submit(GenerationRequest(long_prompt(tiny, 4 * CHUNK), greedy(3)))
    short_handle = scheduler.submit(GenerationRequest("Hello", greedy(3)))
    scheduler.start()  # both are queued before the loop first looks
    try:
        _, long = run(long_handle)
        _, short = run(short_handle)
    finally:
        scheduler.stop()
    assert short.timings.first_token_s > long.timings.total_s - 0.01
