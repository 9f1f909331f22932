"""The token diff's changed features with two SAEs attached on the test tier ("late" after block 2, the default;
"early" after block 1): every SAE reads, each change names its SAE, its numbers are that SAE's re-encoding of
the two answers, and the list interleaves the SAEs (each ranked by |delta|, a tier ordered by |delta| / that SAE's
typical firing activation), computed by hand."""

from __future__ import annotations

import pytest
import torch

from engine.generation import FinishEvent, GenerationRequest
from engine.sampling import SamplingParams
from engine.steering import SteeringFeature, SteeringSpec
from engine.token_diff import token_diff
from tests.engine.two_saes import EARLY, LATE, two_sae_runtime

PROMPT = "The cat"
MOON = 42  # a word feature at the same index in both test-tier SAEs


@pytest.fixture(scope="module")
def runtime(test_tier_assets):
    yield from two_sae_runtime(test_tier_assets)


def greedy(runtime, prompt_ids, steering=None, max_tokens=8):
    handle = runtime.scheduler.submit(GenerationRequest(prompt_ids, SamplingParams(max_tokens=max_tokens,
                                                                                   temperature=0.0),
                                                        steering=steering))
    return [e.token_id for e in handle if not isinstance(e, FinishEvent)]


def encoded(runtime, name, prompt_ids, ids):
    """SAE `name`'s features of the generated tokens under the plain model, (n, d_sae)."""
    sae = runtime.attached[name].sae
    with torch.inference_mode():
        hidden = runtime.loaded.model(input_ids=torch.tensor([prompt_ids + ids]),
                                      output_hidden_states=True).hidden_states[sae.hook_layer + 1]
        return sae.encode(hidden[0, len(prompt_ids):]).float()


@pytest.fixture(scope="module")
def steered_early(runtime):
    """Steer only the early SAE's feature; the diff read by both SAEs."""
    prompt_ids = list(runtime.loaded.tokenizer(PROMPT)["input_ids"])
    compiled = runtime.compile(SteeringSpec(features=(SteeringFeature(MOON, 60.0, sae=EARLY),)))
    unsteered, steered = greedy(runtime, prompt_ids), greedy(runtime, prompt_ids, compiled)
    assert steered != unsteered
    readers = {name: a.sae for name, a in runtime.attached.items()}
    diff = runtime.scheduler.call(lambda: token_diff(
        runtime.loaded.model, runtime.scheduler.interceptors, prompt_ids=prompt_ids, steered_ids=steered,
        unsteered_ids=unsteered, steering=compiled, pad_id=runtime.loaded.tokenizer.pad_token_id or 0,
        saes=readers, top_features=10)).result()
    return prompt_ids, unsteered, steered, diff


def test_changed_features_come_from_both_saes_with_their_names(steered_early):
    _, _, _, diff = steered_early
    top = diff.top_changed_features
    assert 0 < len(top) <= 10
    # Steering at layer 1 changes the text, so the later (layer 2) SAE's features change too.
    assert {f.sae for f in top} == {LATE, EARLY}


def test_each_change_is_its_own_saes_reencoding_and_the_list_interleaves_the_saes(
        runtime, steered_early):
    prompt_ids, unsteered, steered, diff = steered_early
    expected = {}
    for name in (LATE, EARLY):
        after, before = encoded(runtime, name, prompt_ids, steered), encoded(runtime, name, prompt_ids, unsteered)
        both = torch.cat([after, before])
        scale = float(both[both > 0].mean())  # a_S: the SAE's mean firing activation on these two answers
        expected[name] = (before.mean(0), after.mean(0), scale)
    for change in diff.top_changed_features:
        before, after, scale = expected[change.sae]
        assert change.before == pytest.approx(float(before[change.index]), abs=1e-4)
        assert change.after == pytest.approx(float(after[change.index]), abs=1e-4)
        assert change.delta == pytest.approx(change.after - change.before, abs=1e-6)
        assert change.relative_delta == pytest.approx(change.delta / scale, rel=1e-4, abs=1e-6)
    # By hand: each SAE's changes ranked by |delta|, interleaved (every SAE's 1st, then 2nd, ...), a tier ordered
    # by |delta| / a_S, the first ten kept.
    tiers = []
    for name, (before, after, scale) in expected.items():
        delta = after - before
        order = [i for i in delta.abs().argsort(descending=True).tolist() if delta[i] != 0][:10]
        tiers += [(rank, -abs(float(delta[i])) / scale, name, i) for rank, i in enumerate(order)]
    by_hand = [(name, i) for _, _, name, i in sorted(tiers)][:10]
    assert [(c.sae, c.index) for c in diff.top_changed_features] == by_hand
    # Both SAEs are in it: the first tier holds each SAE's largest change.
    assert {c.sae for c in diff.top_changed_features[:2]} == {LATE, EARLY}


def test_one_sae_ranks_by_delta_as_before(runtime, steered_early):
    prompt_ids, unsteered, steered, _ = steered_early
    compiled = runtime.compile(SteeringSpec(features=(SteeringFeature(MOON, 60.0, sae=EARLY),)))
    alone = runtime.scheduler.call(lambda: token_diff(
        runtime.loaded.model, runtime.scheduler.interceptors, prompt_ids=prompt_ids, steered_ids=steered,
        unsteered_ids=unsteered, steering=compiled, pad_id=runtime.loaded.tokenizer.pad_token_id or 0,
        sae=runtime.attached[LATE].sae)).result()
    deltas = [abs(c.delta) for c in alone.top_changed_features]
    assert deltas and deltas == sorted(deltas, reverse=True) and {c.sae for c in alone.top_changed_features} == {None}
