"""The continuous-batching scheduler on the tiny test-tier Llama: batched output equals solo output,
sampling, stops, finishes, cancellation, the interceptor protocol and the async event API."""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time

import pytest
import torch

from engine.generation import FinishEvent, GenerationRequest, TokenEvent
from engine.interceptors import ForwardContext
from engine.loading import load_model
from engine.sampling import InvalidRequestError, SamplingParams
from engine.scheduler import GenerationScheduler, SchedulerUnavailableError

PROMPTS = [
    "The cat sat on the",
    "Hello world",
    "Once upon a time there was a little dog who lived by the sea and",
    "A",
    "The quick brown fox jumps over the lazy dog and then",
    "In the city",
    "The gold was bright",
    "She said that the garden",
]
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def tiny(test_tier_assets):
    return load_model(test_tier_assets.model.local_path)


@pytest.fixture(scope="module")
def scheduler(tiny):
    running = GenerationScheduler(tiny, max_batch_size=16).start()
    yield running
    running.stop()


def collect(handle) -> tuple[list[TokenEvent], FinishEvent]:
    events = []
    while True:
        event = handle.get(timeout=TIMEOUT_S)
        if isinstance(event, FinishEvent):
            return events, event
        events.append(event)


def run(scheduler, prompt, **params) -> tuple[list[TokenEvent], FinishEvent]:
    return collect(scheduler.submit(GenerationRequest(prompt, SamplingParams(**params))))


def ids_of(tokens: list[TokenEvent]) -> list[int]:
    return [t.token_id for t in tokens]


def text_of(tokens: list[TokenEvent]) -> str:
    return "".join(t.text_delta for t in tokens)


def test_greedy_equals_model_generate(scheduler, tiny):
    for prompt in PROMPTS[:4]:
        ids = tiny.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            reference = tiny.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=24,
                min_new_tokens=24,
                do_sample=False,
            )[0, ids.shape[1] :].tolist()
        tokens, finish = run(scheduler, prompt, max_tokens=24, temperature=0, ignore_eos=True)
        assert ids_of(tokens) == reference
        assert finish.finish_reason == "length"
        assert finish.usage.prompt_tokens == ids.shape[1] and finish.usage.completion_tokens == 24
        assert text_of(tokens) == tiny.tokenizer.decode(reference, skip_special_tokens=True)


def test_sixteen_concurrent_requests_each_match_their_solo_run(scheduler):
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(16)]
    lengths = [12 + 3 * (i % 7) for i in range(16)]  # rows leave at different steps
    solo = [
        run(scheduler, p, max_tokens=n, temperature=0, ignore_eos=True)
        for p, n in zip(prompts, lengths, strict=True)
    ]

    # Half now, half once the first ones are decoding: rows join a running batch and leave it.
    first = [scheduler.submit(GenerationRequest(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)))
             for p, n in zip(prompts[:8], lengths[:8], strict=True)]  # fmt: skip
    head = first[0].get(timeout=TIMEOUT_S)
    second = [scheduler.submit(GenerationRequest(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)))
              for p, n in zip(prompts[8:], lengths[8:], strict=True)]  # fmt: skip
    batched = [collect(h) for h in first + second]
    batched[0] = ([head, *batched[0][0]], batched[0][1])

    for (solo_tokens, _), (tokens, finish) in zip(solo, batched, strict=True):
        assert ids_of(tokens) == ids_of(solo_tokens)
        assert text_of(tokens) == text_of(solo_tokens)
        assert finish.finish_reason == "length"
    assert scheduler.status().requests_total >= 32


def test_seeded_sampling_repeats_alone_and_in_a_mixed_batch(scheduler):
    params = {"max_tokens": 20, "temperature": 1.0, "top_p": 0.9, "seed": 1234, "ignore_eos": True}
    alone, _ = run(scheduler, PROMPTS[0], **params)
    again, _ = run(scheduler, PROMPTS[0], **params)
    assert ids_of(alone) == ids_of(again)

    others = [
        SamplingParams(max_tokens=25, temperature=0),
        SamplingParams(max_tokens=15, temperature=1.3, seed=7),
        SamplingParams(max_tokens=30, temperature=0.7, top_p=1.0),
    ]
    handles = [scheduler.submit(GenerationRequest(PROMPTS[i + 1], p)) for i, p in enumerate(others)]
    mixed = scheduler.submit(GenerationRequest(PROMPTS[0], SamplingParams(**params)))
    for handle in handles:
        collect(handle)
    assert ids_of(collect(mixed)[0]) == ids_of(alone)

    different, _ = run(scheduler, PROMPTS[0], **{**params, "seed": 99})
    assert ids_of(different) != ids_of(alone)


def test_stop_string_spanning_tokens_is_cut_and_never_emitted(scheduler):
    tokens, _ = run(scheduler, PROMPTS[0], max_tokens=30, temperature=0, ignore_eos=True)
    full = text_of(tokens)
    # The end of one token plus the start of the next, at its first occurrence in the text.
    for k in range(4, 28):
        left, right = tokens[k].text_delta, tokens[k + 1].text_delta
        stop = left[-2:] + right[:2]
        if len(left) >= 2 and len(right) >= 2 and full.index(stop) == len(text_of(tokens[: k + 1])) - 2:
            break
    else:
        pytest.fail(f"no stop string spanning two tokens in {full!r}")
    cut, finish = run(scheduler, PROMPTS[0], max_tokens=30, temperature=0, stop=[stop, "never appears"])
    assert text_of(cut) == full[: full.index(stop)]
    assert finish.finish_reason == "stop"
    assert finish.usage.completion_tokens == len(cut) < 30
    emitted = ""
    for token in cut:  # no event ever carried part of the stop string that a later event took back
        emitted += token.text_delta
        assert full.startswith(emitted)


def test_max_tokens_finishes_with_length(scheduler):
    tokens, finish = run(scheduler, PROMPTS[1], max_tokens=5, temperature=0, ignore_eos=True)
    assert len(tokens) == 5 and finish.finish_reason == "length"
    assert finish.usage.completion_tokens == 5 and finish.usage.total_tokens == finish.usage.prompt_tokens + 5
    assert finish.timings.first_token_s is not None and finish.timings.total_s >= finish.timings.first_token_s


def test_eos_finishes_with_stop_and_emits_no_text_for_it(tiny):
    probe = GenerationScheduler(tiny).start()
    try:
        tokens, _ = run(probe, PROMPTS[0], max_tokens=12, temperature=0, ignore_eos=True)
    finally:
        probe.stop()
    eos = ids_of(tokens)[6]
    with_eos = dataclasses.replace(tiny, eos_token_ids=frozenset({eos}))
    stopping = GenerationScheduler(with_eos).start()
    try:
        cut, finish = run(stopping, PROMPTS[0], max_tokens=12, temperature=0)
    finally:
        stopping.stop()
    position = ids_of(tokens).index(eos)
    assert ids_of(cut) == ids_of(tokens)[: position + 1]
    assert cut[-1].text_delta == "" and finish.finish_reason == "stop"
    assert finish.usage.completion_tokens == position + 1


def test_cancel_a_running_and_a_queued_request(tiny):
    single = GenerationScheduler(tiny, max_batch_size=1).start()
    try:
        running = single.submit(
            GenerationRequest(PROMPTS[0], SamplingParams(max_tokens=500, ignore_eos=True))
        )
        queued = single.submit(GenerationRequest(PROMPTS[1], SamplingParams(max_tokens=5)))
        for _ in range(3):
            assert isinstance(running.get(timeout=TIMEOUT_S), TokenEvent)
        queued.cancel()
        running.cancel()
        _, finish = collect(running)
        assert finish.finish_reason == "cancelled" and 3 <= finish.usage.completion_tokens < 500
        tokens, queued_finish = collect(queued)
        assert tokens == [] and queued_finish.finish_reason == "cancelled"
        assert queued_finish.usage.completion_tokens == 0
        assert single.status().active == 0
    finally:
        single.stop()


def test_context_length_is_checked_at_submit(scheduler, tiny):
    context = tiny.context_length
    with pytest.raises(InvalidRequestError) as caught:
        scheduler.submit(GenerationRequest([5] * (context - 10), SamplingParams(max_tokens=11)))
    assert caught.value.param == "max_tokens" and caught.value.code == "CONTEXT_LENGTH_EXCEEDED"
    assert str(context) in caught.value.message
    with pytest.raises(InvalidRequestError) as caught:
        scheduler.submit(GenerationRequest([5] * context, SamplingParams(), prompt_param="messages"))
    assert caught.value.param == "messages"
    # Exactly filling the context is fine, and max_tokens=None means "up to the context".
    _, finish = collect(
        scheduler.submit(GenerationRequest([5] * (context - 2), SamplingParams(ignore_eos=True)))
    )
    assert finish.finish_reason == "length" and finish.usage.completion_tokens == 2


@pytest.mark.parametrize("prompt", ["", [], [-1], [10**9], ["a"]])
def test_bad_prompts_are_invalid_requests(scheduler, prompt):
    with pytest.raises(InvalidRequestError) as caught:
        scheduler.submit(GenerationRequest(prompt))
    assert caught.value.param == "prompt"


def test_logprobs_match_a_full_forward_pass(scheduler, tiny):
    prompt = tiny.tokenizer(PROMPTS[2])["input_ids"]
    tokens, _ = run(scheduler, prompt, max_tokens=8, temperature=0.8, seed=3, logprobs=True, top_logprobs=3,
                    ignore_eos=True)  # fmt: skip
    with torch.inference_mode():
        logits = tiny.model(torch.tensor([prompt + ids_of(tokens)])).logits[0, len(prompt) - 1 : -1]
    probs = torch.softmax(logits.float(), dim=-1)
    for step, token in enumerate(tokens):
        assert abs(torch.tensor(token.logprob).exp() - probs[step, token.token_id]) < 1e-4
        top_ids = [i for i, _ in token.top_logprobs]
        assert top_ids == probs[step].topk(3).indices.tolist()
        assert [lp for _, lp in token.top_logprobs] == sorted(
            (lp for _, lp in token.top_logprobs), reverse=True
        )
    plain, _ = run(scheduler, prompt, max_tokens=2, temperature=0)
    assert plain[0].logprob is None and plain[0].top_logprobs is None


class Recorder:
    """A fake ForwardInterceptor: keeps every context, 'captures' a pass number for monitored rows."""

    def __init__(self) -> None:
        self.contexts: list[ForwardContext | None] = []

    def set_context(self, context: ForwardContext | None) -> None:
        self.contexts.append(context)

    def collect(self) -> dict[str, object]:
        context = self.contexts[-1]
        if context is None:
            return {}
        return {row.request_id: ("pass", len(self.contexts)) for row in context.rows if row.monitor}


def test_interceptors_see_each_pass_with_correct_masks(tiny):
    recorder = Recorder()
    engine = GenerationScheduler(tiny, interceptors=[recorder])  # not started: both requests queue up
    steering = object()
    short = engine.submit(
        GenerationRequest(
            "Hello world",
            SamplingParams(max_tokens=2, temperature=0),
            steering=steering,
            monitor=True,
            request_id="short",
        )  # fmt: skip
    )
    long = engine.submit(
        GenerationRequest(PROMPTS[2], SamplingParams(max_tokens=4, temperature=0), request_id="long")
    )
    engine.start()
    try:
        short_tokens, _ = collect(short)
        long_tokens, _ = collect(long)
        assert engine.call(lambda: "ran").result(timeout=TIMEOUT_S) == "ran"
    finally:
        engine.stop()

    prefill, *decodes = [c for c in recorder.contexts if c is not None]
    short_len = short.prompt_tokens
    long_len = long.prompt_tokens
    assert [r.request_id for r in prefill.rows] == ["short", "long"]
    assert prefill.rows[0].steering is steering and prefill.rows[0].monitor and not prefill.rows[1].monitor
    assert prefill.valid_mask.shape == (2, long_len)
    assert prefill.valid_mask[0].tolist() == [False] * (long_len - short_len) + [True] * short_len
    assert prefill.valid_mask[1].all() and not prefill.generated_mask.any()
    # short: 2 tokens (prefill + 1 decode), long: 4 tokens (prefill + 3 decodes)
    assert [len(c.rows) for c in decodes] == [2, 1, 1]
    assert [r.request_id for r in decodes[1].rows] == ["long"]
    for context in decodes:
        assert context.valid_mask.shape == (len(context.rows), 1)
        assert context.valid_mask.all() and context.generated_mask.all()
    assert recorder.contexts[-1] is None  # call() runs with no batch context
    # Captures ride on the token each pass produced, for monitored rows only.
    assert [t.captures for t in short_tokens] == [(("pass", 1),), (("pass", 2),)]
    assert all(t.captures == () for t in long_tokens)


def test_async_batches_deliver_the_same_events(scheduler):
    expected, _ = run(scheduler, PROMPTS[3], max_tokens=10, temperature=0, ignore_eos=True)

    async def consume():
        handle = scheduler.submit(
            GenerationRequest(PROMPTS[3], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
        )
        events = []
        async for batch in handle.batches():
            assert batch
            events.extend(batch)
        return events

    async def consume_and_cancel():
        handle = scheduler.submit(
            GenerationRequest(PROMPTS[3], SamplingParams(max_tokens=900, temperature=0, ignore_eos=True))
        )
        batches = [batch async for batch in _cancel_after_first(handle)]
        return batches[-1][-1]

    async def both():
        return await asyncio.gather(consume(), consume_and_cancel())

    events, cancelled = asyncio.run(asyncio.wait_for(both(), TIMEOUT_S))
    assert isinstance(events[-1], FinishEvent)
    assert ids_of(events[:-1]) == ids_of(expected)
    assert cancelled.finish_reason == "cancelled" and cancelled.usage.completion_tokens < 900


def test_a_pause_between_batches_coalesces_tokens_and_a_finish_cuts_it_short(scheduler):
    expected, _ = run(scheduler, PROMPTS[3], max_tokens=30, temperature=0, ignore_eos=True)

    async def consume(pause_s: float):
        handle = scheduler.submit(
            GenerationRequest(PROMPTS[3], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
        )
        started = time.monotonic()
        batches = [batch async for batch in handle.batches(pause=lambda: pause_s)]
        return batches, time.monotonic() - started

    batches, elapsed = asyncio.run(asyncio.wait_for(consume(5.0), TIMEOUT_S))
    events = [event for batch in batches for event in batch]
    assert isinstance(events[-1], FinishEvent) and ids_of(events[:-1]) == ids_of(expected)
    assert len(batches) <= 3  # the tokens of the pause came together
    assert elapsed < 2.5  # ...and the finish did not wait out the 5 s pause


async def _cancel_after_first(handle):
    async for batch in handle.batches():
        yield batch
        handle.cancel()


def test_status_embed_and_concurrent_submitters(scheduler, tiny):
    results: queue.SimpleQueue = queue.SimpleQueue()

    def submitter(i: int) -> None:
        results.put(run(scheduler, PROMPTS[i], max_tokens=6, temperature=0, ignore_eos=True)[1].finish_reason)

    threads = [threading.Thread(target=submitter, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    embedded = scheduler.embed(["The cat"])
    for thread in threads:
        thread.join(TIMEOUT_S)
    assert [results.get_nowait() for _ in range(6)] == ["length"] * 6
    assert len(embedded.embeddings[0]) == tiny.hidden_size
    status = scheduler.status()
    assert status.running and status.active == 0 and status.queued == 0
    assert status.tokens_per_second > 0 and status.tokens_total > 0


def test_stop_cancels_and_refuses_new_work(tiny):
    engine = GenerationScheduler(tiny, max_queued=2)
    first = engine.submit(GenerationRequest(PROMPTS[0]))
    engine.submit(GenerationRequest(PROMPTS[1]))
    with pytest.raises(SchedulerUnavailableError):
        engine.submit(GenerationRequest(PROMPTS[2]))
    engine.stop()  # never started: the queue is answered anyway
    assert collect(first)[1].finish_reason == "cancelled"
    with pytest.raises(SchedulerUnavailableError):
        engine.submit(GenerationRequest(PROMPTS[0]))

    running = GenerationScheduler(tiny).start()
    handle = running.submit(GenerationRequest(PROMPTS[0], SamplingParams(max_tokens=900, ignore_eos=True)))
    handle.get(timeout=TIMEOUT_S)
    running.stop()
    assert collect(handle)[1].finish_reason == "cancelled"
    assert not running.status().running


def test_sliding_window_layers_batch_like_solo_runs(tiny):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=tiny.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=6,
    )  # fmt: skip
    model = MistralForCausalLM(config).eval()
    mistral = dataclasses.replace(tiny, model=model, eos_token_ids=frozenset(), context_length=256)
    engine = GenerationScheduler(mistral).start()
    try:
        layers = {
            type(layer).__name__ for layer in __import__("transformers").DynamicCache(config=config).layers
        }
        assert "DynamicSlidingWindowLayer" in layers
        prompts = [PROMPTS[2], PROMPTS[3], PROMPTS[0]]
        solo = [
            ids_of(run(engine, p, max_tokens=14 + 4 * i, temperature=0)[0]) for i, p in enumerate(prompts)
        ]
        handles = [
            engine.submit(GenerationRequest(p, SamplingParams(max_tokens=14 + 4 * i, temperature=0)))
            for i, p in enumerate(prompts)
        ]
        assert [ids_of(collect(h)[0]) for h in handles] == solo
        ids = tiny.tokenizer(prompts[0], return_tensors="pt").input_ids
        with torch.inference_mode():
            reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=14,
                                       do_sample=False, eos_token_id=None)[0, ids.shape[1]:].tolist()  # fmt: skip
        assert solo[0] == reference
    finally:
        engine.stop()


def test_sae_hook_steers_and_monitors_each_row_on_its_own(tiny, test_tier_assets):
    import json

    from engine.sae import load_sae
    from engine.sae_hook import FeatureCapture, SaeHook
    from engine.steering import SteeringFeature, SteeringSpec

    manifest = json.loads((test_tier_assets.model.local_path.parent / "manifest.json").read_text())
    feature = manifest["features"][0]
    hook = SaeHook()
    engine = GenerationScheduler(tiny, interceptors=[hook]).start()
    try:
        sae = load_sae(test_tier_assets.sae.local_path)
        engine.call(lambda: hook.attach(tiny.model, sae)).result(timeout=TIMEOUT_S)
        strength = 3 * manifest["residual_norm_median"]
        steering = hook.compile(SteeringSpec((SteeringFeature(feature["index"], strength),)))
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        plain = text_of(collect(engine.submit(GenerationRequest("The city", params)))[0])
        steered = text_of(collect(engine.submit(GenerationRequest("The city", params, steering=steering)))[0])
        assert steered.count(feature["token"]) > plain.count(feature["token"])

        handles = [
            engine.submit(
                GenerationRequest("The city", params, steering=steering if i % 2 else None, monitor=i == 3)
            )
            for i in range(6)
        ]
        results = [collect(h)[0] for h in handles]
        assert [text_of(r) for r in results] == [steered if i % 2 else plain for i in range(6)]
        captures = [t.captures for t in results[3]]
        assert all(len(c) == 1 and isinstance(c[0], FeatureCapture) for c in captures)
        assert captures[0][0].generated == [False] * handles[3].prompt_tokens  # prefill: the prompt
        assert [c[0].generated for c in captures[1:]] == [[True]] * 11  # then one generated input each
        assert all(t.captures == () for r in results[:3] for t in r)
    finally:
        engine.call(hook.detach).result(timeout=TIMEOUT_S)
        engine.stop()
