"""Conditional steering and abort, checked against hand computations: the math on a hand-made SAE, then
the test tier (a condition on the ' cat' feature changes only the positions where ' cat' is; abort
stops at the first generated ' cat'), and bad conditions refused before anything applies."""

from __future__ import annotations

import math

import pytest
import torch

from engine.errors import InvalidFeatureIndexError, InvalidSteeringError, SaeNotAttachedError
from engine.generation import FinishEvent, TokenEvent
from engine.runtime import EngineRuntime
from engine.sae import SaeWeights, decoder_layers
from engine.steering import SteeringFeature, SteeringSpec
from engine.steering_conditions import (
    ConditionalFeature,
    FeatureCondition,
    SteeringConditions,
    apply_conditions,
    batch_conditions,
    collect_aborts,
    compile_conditions,
)

CAT = 7  # the test tier's ' cat' feature (engine/assets/tiny.py)
PROMPT = "The cat sat on the mat and the dog"


def small_sae() -> SaeWeights:
    W_enc = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    W_dec = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    return SaeWeights(architecture="standard", hook_name="blocks.0.hook_resid_post", hook_layer=0, W_enc=W_enc,
                      b_enc=torch.zeros(3), W_dec=W_dec, b_dec=torch.zeros(4))


def test_the_gate_adds_the_delta_only_where_the_condition_holds_per_row():
    sae = small_sae()
    # f_1 = relu(h[..., 1]) by construction: row 0's tokens read 0.5, 3.0, 5.0 on feature 1.
    h = torch.tensor([[[0.0, 0.5, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0], [0.0, 5.0, 9.0, 0.0]],
                      [[0.0, 4.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0]]])
    conditional = compile_conditions(sae, SteeringConditions(
        features=(ConditionalFeature(0, 2.0, FeatureCondition(1, above=1.0, below=4.0)),
                  ConditionalFeature(2, -1.0, FeatureCondition(1, above=4.5))),
        abort_when=(FeatureCondition(2, above=8.0),)))
    batch = batch_conditions([conditional, None], device=torch.device("cpu"), dtype=torch.float32)
    generated = torch.tensor([[False, True, True], [False, True, True]])
    valid = torch.ones(2, 3, dtype=torch.bool)
    steered, aborts = apply_conditions(h, h.clone(), batch, generated, valid)
    expected = h.clone()
    expected[0, 1, 0] += 2.0  # 1 < 3.0 < 4: feature 0 (W_dec row e0) at strength 2
    expected[0, 2, 3] -= 1.0  # 5.0 > 4.5: feature 2 (W_dec row e3) at strength -1
    torch.testing.assert_close(steered, expected)  # row 1 has no conditions: untouched
    found = collect_aborts(aborts, ["a", "b"], batch.conditions)
    assert list(found) == ["a"] and found["a"].index == 2 and found["a"].value == pytest.approx(9.0)


def test_bad_conditions_are_refused():
    sae = small_sae()
    for bad, error in (
        (SteeringConditions(abort_when=(FeatureCondition(3, above=1.0),)), InvalidFeatureIndexError),
        (SteeringConditions(abort_when=(FeatureCondition(1, above=math.nan),)), InvalidSteeringError),
        (SteeringConditions(abort_when=(FeatureCondition(1),)), InvalidSteeringError),
        (SteeringConditions(features=(ConditionalFeature(9, 1.0, FeatureCondition(1, above=1.0)),)),
         InvalidFeatureIndexError),
        (SteeringConditions(features=(ConditionalFeature(0, math.inf, FeatureCondition(1, above=1.0)),)),
         InvalidSteeringError),
    ):
        with pytest.raises(error):
            compile_conditions(sae, bad)
    with pytest.raises(InvalidSteeringError, match="additive"):
        compile_conditions(sae, SteeringConditions(features=(ConditionalFeature(0, 1.0, FeatureCondition(1, above=1)),)),
                           mode="clamp")


@pytest.fixture(scope="module")
def runtime(test_tier_assets):
    runtime = EngineRuntime(torch_threads=1)
    runtime.load(name="tiny", path=str(test_tier_assets.model.local_path))
    runtime.attach_sae(name="sae", path=str(test_tier_assets.sae.local_path))
    runtime.configure_monitoring(enabled=False)
    yield runtime
    runtime.unload()


def layer_outputs(runtime, **submit):
    """Generate greedily while recording the hooked layer's (steered) outputs; (events, outputs)."""
    outputs = []
    layer = decoder_layers(runtime.loaded.model)[runtime.hook.sae.hook_layer]
    handle = runtime.scheduler.call(lambda: layer.register_forward_hook(
        lambda _m, _a, out: outputs.append((out[0] if isinstance(out, tuple) else out).clone()))).result()
    try:
        submitted = runtime.submit(request_id=f"r{id(outputs)}", model=None, prompt=PROMPT, messages=None,
                                   params={"max_tokens": 8, "temperature": 0.0}, steering=None, **submit)
        events = list(submitted.handle)
    finally:
        runtime.scheduler.call(handle.remove).result()
    return events, outputs


def cat_values(runtime, token_ids):
    """f_cat at every position of one unsteered pass (the residual before steering depends on the tokens only)."""
    sae = runtime.hook.sae
    kept = []
    layer = decoder_layers(runtime.loaded.model)[sae.hook_layer]

    def work():
        handle = layer.register_forward_hook(lambda _m, _a, out: kept.append(out[0] if isinstance(out, tuple) else out))
        try:
            runtime.loaded.model(torch.tensor([token_ids]))
        finally:
            handle.remove()
        return sae.encode(kept[0][0])[:, CAT]

    return runtime.scheduler.call(work).result()


def test_a_condition_on_the_cat_feature_changes_only_the_cat_positions(runtime):
    prompt_ids = list(runtime.loaded.tokenizer(PROMPT)["input_ids"])
    values = cat_values(runtime, prompt_ids)
    threshold = float(values.max()) / 2
    holds = (values > threshold).nonzero().flatten().tolist()
    assert holds and len(holds) < len(prompt_ids)  # ' cat' is there, and not everywhere
    plain_events, plain = layer_outputs(runtime)
    conditions = SteeringConditions(features=(ConditionalFeature(3, 25.0, FeatureCondition(CAT, above=threshold)),))
    _, steered = layer_outputs(runtime, conditions=conditions)
    changed = (steered[0] - plain[0]).abs().amax(-1)[0]  # the prefill pass, (T,)
    assert (changed > 1e-4).nonzero().flatten().tolist() == holds
    delta = 25.0 * runtime.hook.sae.W_dec[3]
    for t in holds:
        torch.testing.assert_close(steered[0][0, t], plain[0][0, t] + delta, atol=1e-4, rtol=1e-4)


def test_abort_stops_at_the_first_generated_token_where_it_holds(runtime):
    prompt_ids = list(runtime.loaded.tokenizer(PROMPT)["input_ids"])
    toward_cat = SteeringSpec(features=(SteeringFeature(CAT, 40.0),))
    events = list(runtime.submit(request_id="free", model=None, prompt=PROMPT, messages=None,
                                 params={"max_tokens": 8, "temperature": 0.0}, steering=toward_cat).handle)
    generated = [e.token_id for e in events if isinstance(e, TokenEvent)]
    values = cat_values(runtime, prompt_ids + generated)[len(prompt_ids):len(prompt_ids) + len(generated) - 1]
    threshold = float(values.max()) / 2
    k = int((values > threshold).nonzero()[0])  # the first generated input token where the condition holds
    aborted = list(runtime.submit(request_id="abort", model=None, prompt=PROMPT, messages=None,
                                  params={"max_tokens": 8, "temperature": 0.0}, steering=toward_cat,
                                  conditions=SteeringConditions(abort_when=(FeatureCondition(CAT, above=threshold),)),
                                  ).handle)
    finish = aborted[-1]
    assert isinstance(finish, FinishEvent) and finish.finish_reason == "content_filter"
    assert [e.token_id for e in aborted[:-1]] == generated[:k + 1]
    assert finish.abort["position"] == len(prompt_ids) + k and finish.abort["token_id"] == generated[k]
    assert finish.abort["index"] == CAT and finish.abort["value"] == pytest.approx(float(values[k]), abs=1e-3)
    assert finish.usage.completion_tokens == k + 1


def test_a_condition_without_an_sae_is_refused_and_nothing_applies(runtime, test_tier_assets):
    runtime.detach_sae()
    try:
        with pytest.raises(SaeNotAttachedError):
            runtime.set_active_steering(SteeringSpec(features=()), label="active",
                                        conditions=SteeringConditions(abort_when=(FeatureCondition(1, above=1.0),)))
        assert runtime.active_conditions is None and runtime.active_label == "none"
    finally:
        runtime.attach_sae(name="sae", path=str(test_tier_assets.sae.local_path))
    with pytest.raises(InvalidFeatureIndexError):
        runtime.set_active_steering(SteeringSpec(features=(SteeringFeature(CAT, 1.0),)), label="active",
                                    conditions=SteeringConditions(abort_when=(FeatureCondition(10**6, above=1.0),)))
    assert runtime.active_steering is None and runtime.active_conditions is None


def test_a_batch_mixing_conditions_gives_each_row_the_text_it_gets_alone(runtime):
    prompt_ids = list(runtime.loaded.tokenizer(PROMPT)["input_ids"])
    threshold = float(cat_values(runtime, prompt_ids).max()) / 2
    toward_cat = SteeringSpec(features=(SteeringFeature(CAT, 40.0),))
    rows = [
        {"steering": None, "conditions": None},
        {"steering": None, "conditions": SteeringConditions(
            features=(ConditionalFeature(3, 25.0, FeatureCondition(CAT, above=threshold)),))},
        {"steering": toward_cat, "conditions": SteeringConditions(abort_when=(FeatureCondition(CAT, above=threshold),))},
        {"steering": toward_cat, "conditions": None},
    ]

    def submit(n: int, row: dict):
        return runtime.submit(request_id=f"mix{n}-{id(row)}", model=None, prompt=PROMPT, messages=None,
                              params={"max_tokens": 8, "temperature": 0.0}, **row).handle

    def outcome(handle):
        events = list(handle)
        return [e.token_id for e in events[:-1]], events[-1].finish_reason, events[-1].abort

    alone = [outcome(submit(n, row)) for n, row in enumerate(rows)]
    # All submitted before the loop admits them: one prefill group, one decode batch.
    handles = runtime.scheduler.call(lambda: [submit(n, row) for n, row in enumerate(rows)]).result()
    together = [outcome(handle) for handle in handles]
    assert together == alone
    assert alone[2][1] == "content_filter" and alone[3][1] == "length"


def test_a_conditional_feature_follows_the_concept_direction_and_refuses_a_layer_spread(runtime):
    """`direction: "concept"` steers a conditional feature along its concept direction (where the condition
    holds, at its SAE's layer); `layers` cannot carry a condition, so it is refused before anything applies."""
    from dataclasses import replace as dataclass_replace

    name = runtime.sae_name
    attached = runtime.attached[name]
    sae = runtime.hook.sae
    directions = torch.nn.functional.normalize(torch.randn(sae.d_sae, sae.d_in, generator=torch.Generator().manual_seed(3)), dim=-1)
    runtime.attached[name] = dataclass_replace(attached, concept_directions=directions)
    try:
        prompt_ids = list(runtime.loaded.tokenizer(PROMPT)["input_ids"])
        threshold = float(cat_values(runtime, prompt_ids).max()) / 2
        conditions = SteeringConditions(features=(ConditionalFeature(3, 25.0, FeatureCondition(CAT, above=threshold)),))
        _, plain = layer_outputs(runtime)
        outputs = []
        layer = decoder_layers(runtime.loaded.model)[sae.hook_layer]
        handle = runtime.scheduler.call(lambda: layer.register_forward_hook(
            lambda _m, _a, out: outputs.append((out[0] if isinstance(out, tuple) else out).clone()))).result()
        try:
            list(runtime.submit(request_id="concept", model=None, prompt=PROMPT, messages=None,
                                params={"max_tokens": 2, "temperature": 0.0},
                                steering=SteeringSpec(features=(), direction="concept"), conditions=conditions).handle)
        finally:
            runtime.scheduler.call(handle.remove).result()
        changed = (outputs[0] - plain[0]).abs().amax(-1)[0]
        holds = (changed > 1e-4).nonzero().flatten().tolist()
        assert holds
        for t in holds:
            torch.testing.assert_close(outputs[0][0, t], plain[0][0, t] + 25.0 * directions[3], atol=1e-4, rtol=1e-4)

        with pytest.raises(InvalidSteeringError, match="layers"):
            runtime.submit(request_id="spread", model=None, prompt=PROMPT, messages=None, params={"max_tokens": 2},
                           steering=SteeringSpec(features=(), layers=(0, 1)), conditions=conditions)
        with pytest.raises(InvalidSteeringError, match="layers"):
            runtime.set_active_steering(SteeringSpec(features=(SteeringFeature(CAT, 1.0),), layers=(0, 1)),
                                        label="active", conditions=conditions)
        assert runtime.active_steering is None and runtime.active_conditions is None
    finally:
        runtime.attached[name] = attached
