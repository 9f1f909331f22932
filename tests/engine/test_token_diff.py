"""The token-level diff and its scoring, against numbers computed by hand and by plain model forwards."""

from __future__ import annotations

import math

import pytest
import torch

from engine.generation import FinishEvent, GenerationRequest
from engine.runtime import EngineRuntime
from engine.sampling import SamplingParams
from engine.steering import SteeringFeature, SteeringSpec
from engine.token_diff import ScoringRow, first_divergence, kl_divergence, score_rows, token_diff

PROMPT = "The cat"


def test_kl_of_two_known_distributions():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]]).log()
    q = torch.tensor([[0.25, 0.75], [0.5, 0.5]]).log()
    by_hand = [0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), math.log(2.0)]  # 0·log 0 = 0
    assert kl_divergence(p, q).tolist() == pytest.approx(by_hand, abs=1e-6)
    assert kl_divergence(q, q).tolist() == pytest.approx([0.0, 0.0], abs=1e-7)


def test_first_divergence_of_known_sequences():
    assert first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert first_divergence([5, 2], [1, 2]) == 0
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # the shorter one ends there
    assert first_divergence([], []) is None


@pytest.fixture(scope="module")
def runtime(test_tier_assets):
    runtime = EngineRuntime(torch_threads=1)
    runtime.load(name="tiny", path=str(test_tier_assets.model.local_path))
    runtime.attach_sae(name="sae", path=str(test_tier_assets.sae.local_path))
    yield runtime
    runtime.unload()


def greedy(runtime: EngineRuntime, prompt_ids: list[int], steering=None, max_tokens: int = 8) -> list[int]:
    handle = runtime.scheduler.submit(GenerationRequest(prompt_ids, SamplingParams(max_tokens=max_tokens,
                                                                                   temperature=0.0),
                                                        steering=steering))
    return [e.token_id for e in handle if not isinstance(e, FinishEvent)]


def plain_log_probs(runtime: EngineRuntime, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return runtime.loaded.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


def run_diff(runtime, prompt_ids, steered, unsteered, compiled):
    loaded = runtime.loaded
    return runtime.scheduler.call(lambda: token_diff(
        loaded.model, runtime.scheduler.interceptors, prompt_ids=prompt_ids, steered_ids=steered,
        unsteered_ids=unsteered, steering=compiled, pad_id=loaded.tokenizer.pad_token_id or 0,
        sae=runtime.hook.sae)).result()


def test_the_diff_matches_plain_forwards_with_and_without_the_steering(runtime):
    prompt_ids = list(runtime.loaded.tokenizer(PROMPT)["input_ids"])
    compiled = runtime.compile(SteeringSpec(features=(SteeringFeature(42, 60.0),)))
    unsteered, steered = greedy(runtime, prompt_ids), greedy(runtime, prompt_ids, compiled)
    assert steered != unsteered
    diff = run_diff(runtime, prompt_ids, steered, unsteered, compiled)
    p, n = len(prompt_ids), len(steered)
    plain = plain_log_probs(runtime, prompt_ids + steered)[p - 1 : p - 1 + n]
    runtime.hook.set_default_steering(compiled)  # a plain forward with the same steering on every position
    try:
        steered_dists = plain_log_probs(runtime, prompt_ids + steered)[p - 1 : p - 1 + n]
    finally:
        runtime.hook.set_default_steering(None)
    ids = torch.tensor(steered)
    assert [t.token_id for t in diff.tokens] == steered and [t.position for t in diff.tokens] == list(range(n))
    assert [t.unsteered_logprob for t in diff.tokens] == pytest.approx(plain[range(n), ids].tolist(), abs=1e-4)
    assert [t.steered_logprob for t in diff.tokens] == pytest.approx(steered_dists[range(n), ids].tolist(), abs=1e-4)
    # Exact at temperature 0: every steered token is the arg-max of its steered distribution.
    assert steered_dists.argmax(-1).tolist() == steered
    kl = (steered_dists.exp() * (steered_dists - plain)).sum(-1)
    assert [t.kl for t in diff.tokens] == pytest.approx(kl.tolist(), abs=1e-4)
    assert diff.first_divergence == first_divergence(steered, unsteered)
    assert diff.first_divergence is not None and steered[: diff.first_divergence] == unsteered[: diff.first_divergence]


def test_top_changed_features_are_the_mean_activation_change_read_before_steering(runtime):
    prompt_ids = list(runtime.loaded.tokenizer(PROMPT)["input_ids"])
    compiled = runtime.compile(SteeringSpec(features=(SteeringFeature(42, 60.0),)))
    unsteered, steered = greedy(runtime, prompt_ids), greedy(runtime, prompt_ids, compiled)
    diff = run_diff(runtime, prompt_ids, steered, unsteered, compiled)
    sae = runtime.hook.sae
    p = len(prompt_ids)

    def mean_features(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            hidden = runtime.loaded.model(input_ids=torch.tensor([prompt_ids + ids]),
                                          output_hidden_states=True).hidden_states[sae.hook_layer + 1]
            return sae.encode(hidden[0, p:]).float().mean(0)

    before, after = mean_features(unsteered), mean_features(steered)
    top = diff.top_changed_features
    assert top and 42 in [f.index for f in top]  # the steered "moon" feature fires on the text it wrote
    for change in top:
        assert change.before == pytest.approx(float(before[change.index]), abs=1e-4)
        assert change.after == pytest.approx(float(after[change.index]), abs=1e-4)
        assert change.delta == pytest.approx(change.after - change.before, abs=1e-6)
    assert abs(top[0].delta) == pytest.approx(float((after - before).abs().max()), abs=1e-4)


def test_batched_scoring_equals_one_row_at_a_time(runtime):
    tokenizer = runtime.loaded.tokenizer
    rows = [ScoringRow(list(tokenizer(text)["input_ids"]), list(tokenizer(" the moon was high")["input_ids"])[1:])
            for text in ("The cat", "In the morning the river was long and")]
    loaded, hooks = runtime.loaded, runtime.scheduler.interceptors
    together = runtime.scheduler.call(lambda: score_rows(loaded.model, hooks, rows, pad_id=0,
                                                          sae=runtime.hook.sae)).result()
    for row, scored in zip(rows, together, strict=True):
        alone = runtime.scheduler.call(lambda row=row: score_rows(loaded.model, hooks, [row], pad_id=0,
                                                                  sae=runtime.hook.sae)).result()[0]
        plain = plain_log_probs(runtime, list(row.prompt_ids) + list(row.generated_ids))
        p, n = len(row.prompt_ids), len(row.generated_ids)
        by_hand = plain[range(p - 1, p - 1 + n), list(row.generated_ids)]
        assert scored.logprobs.tolist() == pytest.approx(by_hand.tolist(), abs=1e-4)  # fluency = its mean
        assert scored.mean_logprob == pytest.approx(float(by_hand.mean()), abs=1e-4)
        assert torch.allclose(scored.features, alone.features, atol=1e-4)
