"""OpenAI's logit_bias: an additive per-row bias on the logits before the token is chosen."""

from __future__ import annotations

import pytest
import torch

from engine.generation import GenerationRequest
from engine.loading import load_model
from engine.sampling import InvalidRequestError, SamplingBatch, SamplingParams, sample_next
from engine.scheduler import GenerationScheduler

torch.set_num_threads(1)


def test_bias_is_added_per_row_and_logprobs_stay_the_models():
    logits = torch.tensor([[3.0, 1.0, 0.0, 0.0], [3.0, 1.0, 0.0, 0.0]])
    params = [SamplingParams(temperature=0.0, logprobs=True, logit_bias={"2": 5.0}), SamplingParams(temperature=0.0)]
    batch = SamplingBatch.build(params, [1, 2], torch.device("cpu"))
    sampled = sample_next(logits, batch, torch.zeros(2, dtype=torch.long))
    assert sampled.token_ids.tolist() == [2, 0]  # only the first row was biased
    assert sampled.logprobs[0].item() == pytest.approx(torch.log_softmax(logits[0], -1)[2].item())
    assert logits[0, 2].item() == 0.0  # the caller's logits are left alone


def test_values_are_clamped_to_plus_minus_100_and_pairs_accepted():
    params = SamplingParams(logit_bias=[[5, 250.0], [6, -1e9]])
    assert params.logit_bias == ((5, 100.0), (6, -100.0))
    logits = torch.zeros(1, 8)
    logits[0, 1] = 150.0  # beats a clamped +100 bias
    batch = SamplingBatch.build([SamplingParams(temperature=0.0, logit_bias={5: 1000})], [0], torch.device("cpu"))
    assert sample_next(logits, batch, torch.zeros(1, dtype=torch.long)).token_ids.tolist() == [1]


@pytest.mark.parametrize("bias", [{"-1": 1.0}, {"x": 1.0}, {3: float("nan")}, {3: "big"}, [[1, 2, 3]]])
def test_bad_bias_names_logit_bias(bias):
    with pytest.raises(InvalidRequestError) as caught:
        SamplingParams(logit_bias=bias)
    assert caught.value.param == "logit_bias"


@pytest.fixture(scope="module")
def scheduler(test_tier_assets):
    running = GenerationScheduler(load_model(test_tier_assets.model.local_path), max_batch_size=4).start()
    yield running
    running.stop()


def _greedy_ids(scheduler, prompt: str, **params) -> list[int]:
    handle = scheduler.submit(GenerationRequest(prompt, SamplingParams(max_tokens=4, temperature=0.0, **params)))
    return [event.token_id for event in handle if hasattr(event, "token_id")]


def test_a_plus_100_bias_makes_its_token_the_greedy_choice(scheduler):
    plain = _greedy_ids(scheduler, "The capital of France is")
    target = next(t for t in range(3, 200) if t not in plain)
    biased = _greedy_ids(scheduler, "The capital of France is", logit_bias={target: 100}, ignore_eos=True)
    assert plain != biased and biased == [target] * 4
    banned = _greedy_ids(scheduler, "The capital of France is", logit_bias={plain[0]: -100})
    assert banned[0] != plain[0]


def test_a_token_id_outside_the_vocabulary_is_refused_at_submit(scheduler):
    vocab = scheduler.loaded.vocab_size
    request = GenerationRequest("hi", SamplingParams(max_tokens=2, logit_bias={vocab: 1.0}))
    with pytest.raises(InvalidRequestError) as caught:
        scheduler.submit(request)
    assert caught.value.param == "logit_bias" and str(vocab) in caught.value.message
