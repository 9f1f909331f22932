"""The pieces of generation without the scheduler thread: sampling, text streaming, chat prompts,
the batch KV cache and embeddings (on the tiny test-tier model)."""

from __future__ import annotations

import math

import pytest
import torch

from engine.batch_cache import BatchKVCache, new_cache
from engine.chat import build_chat_prompt
from engine.embeddings import embed
from engine.loading import load_model
from engine.sampling import (
    InvalidRequestError,
    SamplingBatch,
    SamplingParams,
    sample_next,
    uniform_from_seed,
)
from engine.text_stream import IncrementalDetokenizer, StopMatcher


@pytest.fixture(scope="module")
def tiny(test_tier_assets):
    return load_model(test_tier_assets.model.local_path)


# --- SamplingParams ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", 2.5),
        ("max_tokens", True),
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("temperature", float("nan")),
        ("temperature", "hot"),
        ("top_p", 1.5),
        ("top_p", -0.1),
        ("seed", 1.5),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", [""]),
        ("stop", [3]),
        ("logprobs", "yes"),
        ("top_logprobs", 21),
        ("top_logprobs", -1),
    ],
)
def test_invalid_sampling_params_name_their_field(field, value):
    kwargs = {field: value}
    if field == "top_logprobs":
        kwargs["logprobs"] = True
    with pytest.raises(InvalidRequestError) as caught:
        SamplingParams(**kwargs)
    assert caught.value.param == field
    assert caught.value.message


def test_top_logprobs_needs_logprobs():
    with pytest.raises(InvalidRequestError) as caught:
        SamplingParams(top_logprobs=2)
    assert caught.value.param == "top_logprobs"


def test_stop_string_is_normalised_to_a_tuple():
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=None).stop == ()


# --- sampling ------------------------------------------------------------------------------------


def test_uniform_from_seed_is_a_deterministic_uniform():
    seeds = torch.full((20000,), 1234, dtype=torch.long)
    steps = torch.arange(20000)
    u = uniform_from_seed(seeds, steps)
    assert torch.equal(u, uniform_from_seed(seeds, steps))
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.01
    assert abs(u.var().item() - 1 / 12) < 0.005
    other_seed = uniform_from_seed(torch.full((20000,), 1235, dtype=torch.long), steps)
    assert (u != other_seed).float().mean() > 0.99
    big = uniform_from_seed(torch.tensor([2**62 + 7, 7]), torch.tensor([0, 0]))
    assert big[0] != big[1]  # the high half of a seed matters


def _batch(*params: SamplingParams, seeds=None) -> SamplingBatch:
    return SamplingBatch.build(
        list(params), seeds or [11 * (i + 1) for i in range(len(params))], torch.device("cpu")
    )


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    batch = _batch(
        SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(temperature=0)
    )
    chosen = sample_next(logits, batch, torch.zeros(3, dtype=torch.long)).token_ids
    assert chosen[0] == logits[0].argmax() and chosen[2] == logits[2].argmax()


def test_sampling_follows_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -20.0]])
    batch = _batch(SamplingParams(temperature=1.0))
    n = 20000
    draws = torch.stack([sample_next(logits, batch, torch.tensor([k])).token_ids for k in range(n)]).flatten()
    frequencies = torch.bincount(draws, minlength=5).float() / n
    expected = torch.softmax(logits[0], dim=-1)
    assert torch.allclose(frequencies, expected, atol=0.012)


def test_top_p_keeps_only_the_nucleus_and_zero_means_greedy():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    nucleus = _batch(SamplingParams(temperature=1.0, top_p=0.75))
    draws = {sample_next(logits, nucleus, torch.tensor([k])).token_ids.item() for k in range(500)}
    assert draws == {0, 1}
    zero = _batch(SamplingParams(temperature=1.0, top_p=0.0))
    assert {sample_next(logits, zero, torch.tensor([k])).token_ids.item() for k in range(100)} == {0}


def test_a_seeded_row_draws_the_same_alone_or_in_any_batch():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 300, generator=generator)
    params = [
        SamplingParams(temperature=0.8, seed=5),
        SamplingParams(temperature=1.3, top_p=0.9, seed=6),
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, seed=7),
    ]
    seeds = [5, 6, 0, 7]
    steps = torch.tensor([3, 9, 0, 4])
    together = sample_next(logits, _batch(*params, seeds=seeds), steps).token_ids
    for i in range(4):
        alone = sample_next(
            logits[i : i + 1], _batch(params[i], seeds=[seeds[i]]), steps[i : i + 1]
        ).token_ids
        assert alone.item() == together[i].item()


def test_logprobs_are_the_models_own_distribution():
    logits = torch.randn(2, 40, generator=torch.Generator().manual_seed(2))
    batch = _batch(
        SamplingParams(temperature=0.5, logprobs=True, top_logprobs=3), SamplingParams(temperature=0)
    )
    sampled = sample_next(logits, batch, torch.zeros(2, dtype=torch.long))
    probs = torch.softmax(logits, dim=-1)
    chosen = probs.gather(1, sampled.token_ids.unsqueeze(1)).squeeze(1)
    assert torch.allclose(sampled.logprobs.exp(), chosen, atol=1e-6)
    assert sampled.top_ids.shape == (2, 3)
    assert torch.equal(sampled.top_ids[1, 0], logits[1].argmax())
    assert torch.all(sampled.top_logprobs[:, :-1] >= sampled.top_logprobs[:, 1:])
    torch.testing.assert_close(sampled.top_logprobs[0].exp(), probs[0].topk(3).values, atol=1e-6, rtol=1e-5)


# --- text streaming ------------------------------------------------------------------------------


def test_incremental_detokenization_handles_multibyte_and_leading_spaces(tiny):
    tokenizer = tiny.tokenizer
    text = " héllo wörld 😀 日本語 — the cat 🐈‍⬛!"
    prompt = tokenizer("Once upon a time")["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # some characters take several byte-level tokens
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detokenizer.push(i) for i in ids]
    deltas.append(detokenizer.flush())
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_flush_releases_an_incomplete_character(tiny):
    ids = tiny.tokenizer("😀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    detokenizer = IncrementalDetokenizer(tiny.tokenizer, [])
    assert detokenizer.push(ids[0]) == ""
    assert detokenizer.flush() != ""


def test_stop_matcher_cuts_at_a_stop_spanning_pushes():
    matcher = StopMatcher(["STOP", "\n\n"])
    emitted = []
    for delta in ["Hello S", "T", "x and ST", "O", "P after"]:
        text, stopped = matcher.push(delta)
        emitted.append(text)
        if stopped:
            break
    assert stopped
    assert "".join(emitted) == "Hello STx and "
    assert emitted[1] == ""  # "ST" might still become "STOP": held back


def test_stop_matcher_takes_the_earliest_stop_and_flushes_on_end():
    matcher = StopMatcher(["bc", "abcd"])
    assert matcher.push("xab") == ("x", False)
    assert matcher.push("cd") == ("", True)  # "abcd" starts before "bc" does
    other = StopMatcher(["END"])
    assert other.push("the E") == ("the ", False)
    assert other.flush() == "E"


def test_no_stops_is_a_pass_through():
    assert StopMatcher([]).push("anything") == ("anything", False)


# --- chat ----------------------------------------------------------------------------------------


def test_chat_prompt_uses_the_template_without_adding_special_tokens(tiny):
    chat = build_chat_prompt(
        tiny.tokenizer,
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        ],
    )
    assert chat.text.endswith("<|im_start|>assistant\n")
    assert "Hi there" in chat.text
    assert list(chat.token_ids) == tiny.tokenizer(chat.text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content"),
        ([{"role": "user", "content": 42}], "messages[0].content"),
        (["hello"], "messages[0]"),
    ],
)
def test_bad_messages_are_invalid_requests(tiny, messages, param):
    with pytest.raises(InvalidRequestError) as caught:
        build_chat_prompt(tiny.tokenizer, messages)
    assert caught.value.param == param


def test_a_tokenizer_without_template_is_a_clear_error(tiny):
    class Plain:
        chat_template = None

    with pytest.raises(InvalidRequestError, match="no chat template"):
        build_chat_prompt(Plain(), [{"role": "user", "content": "hi"}])


# --- batch KV cache ------------------------------------------------------------------------------


def _prefill(model, prompts: list[list[int]]):
    width = max(map(len, prompts))
    pads = [width - len(p) for p in prompts]
    ids = torch.tensor([[0] * pad + p for p, pad in zip(prompts, pads, strict=True)])
    mask = (torch.arange(width).unsqueeze(0) >= torch.tensor(pads).unsqueeze(1)).long()
    cache = new_cache(model.config)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        past_key_values=cache,
        use_cache=True,
    )
    return BatchKVCache(cache, pads, width, torch.device("cpu")), out.logits[:, -1].argmax(-1)


def _step(model, batch: BatchKVCache, ids: torch.Tensor) -> torch.Tensor:
    mask, positions = batch.decode_inputs()
    out = model(
        input_ids=ids.unsqueeze(1),
        attention_mask=mask,
        position_ids=positions,
        past_key_values=batch.cache,
        use_cache=True,
    )
    batch.commit_step(mask)
    return out.logits[:, -1]


def test_merged_and_trimmed_rows_decode_as_if_alone(tiny):
    model = tiny.model
    long, short = list(range(30, 52)), [40, 41, 42]
    with torch.inference_mode():
        alone_long, first_long = _prefill(model, [long])
        alone_short, first_short = _prefill(model, [short])
        reference_long = _step(model, alone_long, first_long)
        reference_short = _step(model, alone_short, first_short)

        batch, first = _prefill(model, [short])
        joined, first_joined = _prefill(model, [long])
        batch.merge(joined)  # short row gets left-padded to the long one's width
        assert batch.pads == [len(long) - len(short), 0]
        logits = _step(model, batch, torch.cat([first, first_joined]))
        torch.testing.assert_close(logits[0], reference_short[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[1], reference_long[0], atol=1e-5, rtol=1e-5)

        width = batch.width
        batch.select([0])  # the long row leaves: the short one's padding columns go too
        assert batch.width == width - (len(long) - len(short)) and batch.pads == [0]
        assert all(layer.keys.shape[-2] == batch.width for layer in batch.cache.layers)
        step_ids = logits[:1].argmax(-1)
        again = _step(model, batch, step_ids)
        expected = _step(model, alone_short, step_ids)  # the solo cache, fed the same token
        torch.testing.assert_close(again[0], expected[0], atol=1e-5, rtol=1e-5)


# --- embeddings ----------------------------------------------------------------------------------


def test_embeddings_shape_determinism_and_batch_independence(tiny):
    texts = ["The cat sat on the mat.", "Hello", "A much longer sentence about the city and its bright gold."]
    result = embed(tiny, texts)
    assert len(result.embeddings) == 3 and all(len(v) == tiny.hidden_size for v in result.embeddings)
    assert result.token_counts == [len(tiny.tokenizer(t)["input_ids"]) for t in texts]
    assert result.total_tokens == sum(result.token_counts)
    assert embed(tiny, texts).embeddings == result.embeddings
    for vector in result.embeddings:
        assert math.isclose(sum(x * x for x in vector), 1.0, rel_tol=1e-5)
    alone = embed(tiny, [texts[1]]).embeddings[0]
    torch.testing.assert_close(torch.tensor(alone), torch.tensor(result.embeddings[1]), atol=1e-5, rtol=1e-5)
    raw = embed(tiny, texts[:1], normalize=False).embeddings[0]
    assert not math.isclose(sum(x * x for x in raw), 1.0, rel_tol=1e-3)


@pytest.mark.parametrize("texts", [[], "just a string", [""], [[10**9]]])
def test_bad_embedding_inputs(tiny, texts):
    with pytest.raises(InvalidRequestError):
        embed(tiny, texts)
