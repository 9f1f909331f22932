"""Several SAEs attached at once on the test tier ("late" after block 2, the default; "early" after block 1),
checked against hand computations: each SAE's features are added at its own layer, attach/detach and a memory
refusal leave the others attached, a condition on an earlier layer gates the same token and one on a later
layer the next token, a batch mixing rows steering different SAEs gives each row its own text, and bad
addresses are refused with nothing applied."""

from __future__ import annotations

import pytest
import torch

from engine.control_vectors import LayerVector, VectorSteeringSpec
from engine.errors import (
    InsufficientMemoryError,
    InvalidFeatureIndexError,
    InvalidSteeringError,
    SaeNotAttachedError,
)
from engine.generation import TokenEvent
from engine.runtime import EngineRuntime
from engine.sae import decoder_layers
from engine.steering import SteeringFeature, SteeringSpec
from engine.steering_conditions import ConditionalFeature, FeatureCondition, SteeringConditions
from tests.engine.two_saes import EARLY, LATE, two_sae_runtime

CAT = 7  # the ' cat' word feature, at the same index in both test-tier SAEs (engine/assets/tiny.py)
PROMPT = "The cat sat on the mat and the dog"
PROMPT_ENDING_IN_CAT = "The dog sat on the mat and the cat"


@pytest.fixture(scope="module")
def runtime(test_tier_assets):
    yield from two_sae_runtime(test_tier_assets)


def sae(runtime, name):
    return runtime.attached[name].sae


def recorded(runtime, layers, prompt=PROMPT, max_tokens=1, steering=None, **submit):
    """Generate greedily while recording each layer's (steered) output at every pass: ({layer: [pass outputs]}, ids)."""
    outputs = {layer: [] for layer in layers}
    modules = decoder_layers(runtime.loaded.model)
    handles = [runtime.scheduler.call(lambda layer=layer: modules[layer].register_forward_hook(
        lambda _m, _a, out, layer=layer: outputs[layer].append((out[0] if isinstance(out, tuple) else out).clone())
    )).result() for layer in layers]
    try:
        events = list(runtime.submit(request_id=f"r{id(outputs)}", model=None, prompt=prompt, messages=None,
                                     params={"max_tokens": max_tokens, "temperature": 0.0}, steering=steering,
                                     **submit).handle)
    finally:
        for handle in handles:
            runtime.scheduler.call(handle.remove).result()
    return outputs, [e.token_id for e in events if isinstance(e, TokenEvent)]


def feature_values(runtime, name, token_ids, index):
    """f_index of SAE `name` at every position of one unsteered pass over token_ids."""
    weights, kept = sae(runtime, name), []
    layer = decoder_layers(runtime.loaded.model)[weights.hook_layer]

    def work():
        handle = layer.register_forward_hook(lambda _m, _a, out: kept.append(out[0] if isinstance(out, tuple) else out))
        try:
            runtime.loaded.model(torch.tensor([token_ids]))
        finally:
            handle.remove()
        return weights.encode(kept[0][0])[:, index]

    return runtime.scheduler.call(work).result()


def test_both_saes_are_attached_in_order_and_the_first_is_the_default(runtime):
    status = runtime.status()
    assert status["attached_sae"] == LATE == runtime.sae_name
    assert [(s["name"], s["layer"]) for s in status["attached_saes"]] == [(LATE, 2), (EARLY, 1)]
    assert runtime.hook is runtime.attached[LATE].hook


def test_two_saes_on_two_layers_steered_at_once_give_the_expected_residuals_at_both_layers(runtime):
    plain, _ = recorded(runtime, (1, 2))
    early_only = SteeringSpec(features=(SteeringFeature(42, 3.0, sae=EARLY),))
    both = SteeringSpec(features=(SteeringFeature(42, 3.0, sae=EARLY), SteeringFeature(CAT, -2.0)))
    after_early, _ = recorded(runtime, (1, 2), steering=early_only)
    steered, _ = recorded(runtime, (1, 2), steering=both)
    early_delta = 3.0 * sae(runtime, EARLY).W_dec[42]
    late_delta = -2.0 * sae(runtime, LATE).W_dec[CAT]  # no `sae`: the default, "late"
    # Layer 1: h1' = h1 + 3 W_dec_early[42] at every prompt position.
    torch.testing.assert_close(steered[1][0], plain[1][0] + early_delta, atol=1e-5, rtol=1e-5)
    # Layer 2: block 2 of the steered h1, plus -2 W_dec_late[7].
    torch.testing.assert_close(steered[2][0], after_early[2][0] + late_delta, atol=1e-5, rtol=1e-5)
    assert (after_early[2][0] - plain[2][0]).abs().max() > 1e-3  # the early steering did reach layer 2


def test_two_saes_on_one_layer_both_apply(runtime, test_tier_assets):
    runtime.attach_sae(name="late-2", path=str(test_tier_assets.sae.local_path))
    try:
        plain, _ = recorded(runtime, (2,))
        spec = SteeringSpec(features=(SteeringFeature(CAT, 1.5), SteeringFeature(42, 2.5, sae="late-2")))
        steered, _ = recorded(runtime, (2,), steering=spec)
        expected = plain[2][0] + 1.5 * sae(runtime, LATE).W_dec[CAT] + 2.5 * sae(runtime, "late-2").W_dec[42]
        torch.testing.assert_close(steered[2][0], expected, atol=1e-5, rtol=1e-5)
    finally:
        runtime.detach_sae("late-2")
    assert list(runtime.attached) == [LATE, EARLY]


def test_a_condition_on_an_earlier_layer_sae_gates_the_same_token(runtime):
    """Steer the late SAE where the early SAE's ' cat' holds: read in the same pass, at the same token."""
    prompt_ids = list(runtime.loaded.tokenizer(PROMPT)["input_ids"])
    values = feature_values(runtime, EARLY, prompt_ids, CAT)
    threshold = float(values.max()) / 2
    holds = (values > threshold).nonzero().flatten().tolist()
    assert holds and len(holds) < len(prompt_ids)
    plain, _ = recorded(runtime, (2,))
    conditions = SteeringConditions(features=(
        ConditionalFeature(3, 25.0, FeatureCondition(CAT, above=threshold, sae=EARLY)),))  # steered: default SAE
    steered, _ = recorded(runtime, (2,), conditions=conditions)
    changed = (steered[2][0] - plain[2][0]).abs().amax(-1)[0]
    assert (changed > 1e-4).nonzero().flatten().tolist() == holds
    for t in holds:
        torch.testing.assert_close(steered[2][0][0, t], plain[2][0][0, t] + 25.0 * sae(runtime, LATE).W_dec[3],
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prompt, lagged", [(PROMPT_ENDING_IN_CAT, True), (PROMPT, False)])
def test_a_condition_on_a_later_layer_sae_gates_the_next_token(runtime, prompt, lagged):
    """Steer the early SAE where the late SAE's ' cat' holds: layer 2 of the current token comes after layer 1,
    so the condition reads the previous token's value. Prompt positions are never steered; the first generated
    input is steered exactly when ' cat' held at the prompt's last token."""
    prompt_ids = list(runtime.loaded.tokenizer(prompt)["input_ids"])
    values = feature_values(runtime, LATE, prompt_ids, CAT)
    threshold = float(feature_values(runtime, LATE, list(runtime.loaded.tokenizer(PROMPT)["input_ids"]), CAT)
                      .max()) / 2
    assert (float(values[-1]) > threshold) == lagged
    assert (values > threshold).any()  # ' cat' is in both prompts: a same-token reading would steer the prefill
    plain, plain_ids = recorded(runtime, (1,), prompt=prompt, max_tokens=3)
    conditions = SteeringConditions(features=(
        ConditionalFeature(42, 6.0, FeatureCondition(CAT, above=threshold, sae=LATE), sae=EARLY),))
    steered, steered_ids = recorded(runtime, (1,), prompt=prompt, max_tokens=3, conditions=conditions)
    torch.testing.assert_close(steered[1][0], plain[1][0])  # the prefill pass: no prompt position steered
    assert steered_ids[0] == plain_ids[0]  # so the first generated token is the same
    delta = 6.0 * sae(runtime, EARLY).W_dec[42]
    # The first decode pass reads the first generated token; its condition is ' cat' at the prompt's last one.
    expected = plain[1][1] + delta if lagged else plain[1][1]
    torch.testing.assert_close(steered[1][1], expected, atol=1e-5, rtol=1e-5)


def test_a_batch_mixing_rows_that_steer_different_saes_conditions_and_vectors_gives_each_row_its_own_text(runtime):
    specs = {
        "late": SteeringSpec(features=(SteeringFeature(CAT, 40.0),)),
        "early": SteeringSpec(features=(SteeringFeature(CAT, 60.0, sae=EARLY),)),
        "both": SteeringSpec(features=(SteeringFeature(42, 20.0, sae=EARLY), SteeringFeature(77, 30.0, sae=LATE))),
        # The early SAE's feature plus a raw vector at layer 3 (CompiledSteering.other_layers).
        "vector": VectorSteeringSpec(features=(SteeringFeature(128, 25.0, sae=EARLY),), vectors=(
            LayerVector({3: sae(runtime, LATE).W_dec[190].detach().clone()}, strength=30.0),)),
        "none": None,
    }
    conditions = {"early": SteeringConditions(features=(
        ConditionalFeature(128, 15.0, FeatureCondition(CAT, above=1.0, sae=LATE), sae=EARLY),))}

    def submit(name, suffix):
        return runtime.submit(request_id=f"{name}-{suffix}", model=None, prompt=PROMPT, messages=None,
                              params={"max_tokens": 8, "temperature": 0.0}, steering=specs[name],
                              conditions=conditions.get(name))

    def ids(submitted):
        return [e.token_id for e in submitted.handle if isinstance(e, TokenEvent)]

    alone = {name: ids(submit(name, "alone")) for name in specs}
    together = [(name, submit(name, "batch")) for name in specs]
    assert {name: ids(s) for name, s in together} == alone
    assert len({tuple(v) for v in alone.values()}) == len(alone)  # each steering does change the text


def test_detaching_one_keeps_the_other_and_the_next_becomes_the_default(test_tier_assets):
    runtime = EngineRuntime(torch_threads=1)
    runtime.load(name="tiny", path=str(test_tier_assets.model.local_path))
    try:
        runtime.attach_sae(name=LATE, path=str(test_tier_assets.sae.local_path))
        runtime.attach_sae(name=EARLY, path=str(test_tier_assets.extra_saes[0].local_path))
        runtime.set_active_steering(SteeringSpec(features=(SteeringFeature(CAT, 4.0),)), label="active")
        runtime.detach_sae(EARLY)
        assert list(runtime.attached) == [LATE] and runtime.active_label == "active"  # did not use "early"
        runtime.attach_sae(name=EARLY, path=str(test_tier_assets.extra_saes[0].local_path))
        runtime.attach_sae(name=LATE, path=str(test_tier_assets.sae.local_path))  # replaced in place: still the default
        assert list(runtime.attached) == [LATE, EARLY] and runtime.hook is runtime.attached[LATE].hook
        assert runtime.attached[EARLY].hook.part == EARLY and runtime.hook.part is None
        runtime.detach_sae(LATE)
        assert list(runtime.attached) == [EARLY] and runtime.sae_name == EARLY
        assert runtime.active_steering is None and runtime.active_label == "none"  # it was compiled for "late"
        # "early" is the default now: a feature without `sae` means it, at its layer.
        plain, _ = recorded(runtime, (1,))
        steered, _ = recorded(runtime, (1,), steering=SteeringSpec(features=(SteeringFeature(42, 2.0),)))
        torch.testing.assert_close(steered[1][0], plain[1][0] + 2.0 * sae(runtime, EARLY).W_dec[42],
                                   atol=1e-5, rtol=1e-5)
        assert runtime.statistics(top=3, sae=EARLY)["sae"] == EARLY
        with pytest.raises(SaeNotAttachedError):
            runtime.statistics(sae=LATE)
    finally:
        runtime.unload()


def test_an_sae_that_does_not_fit_beside_the_others_is_refused_and_they_stay(test_tier_assets):
    size = (test_tier_assets.sae.local_path / "sae_weights.safetensors").stat().st_size
    runtime = EngineRuntime(torch_threads=1, memory_limit_bytes=int(size * 1.5))  # room for one
    runtime.load(name="tiny", path=str(test_tier_assets.model.local_path))
    try:
        runtime.attach_sae(name=LATE, path=str(test_tier_assets.sae.local_path))
        runtime.set_active_steering(SteeringSpec(features=(SteeringFeature(CAT, 4.0),)), label="active")
        with pytest.raises(InsufficientMemoryError, match="beside the 1 attached"):
            runtime.attach_sae(name=EARLY, path=str(test_tier_assets.extra_saes[0].local_path))
        assert list(runtime.attached) == [LATE] and runtime.active_label == "active"
        assert [h.sae.hook_layer for h in runtime.saes.hooks] == [2]
        # Replacing the attached one counts only the new one.
        runtime.attach_sae(name=LATE, path=str(test_tier_assets.sae.local_path))
        assert list(runtime.attached) == [LATE]
        assert [h.sae.hook_layer for h in runtime.saes.hooks] == [2]  # the old hook is gone
    finally:
        runtime.unload()


def test_bad_addresses_are_refused_and_nothing_applies(runtime):
    runtime.set_active_steering(SteeringSpec(features=(SteeringFeature(CAT, 4.0),)), label="active")
    before = runtime.active_steering
    bad = [
        (SteeringSpec(features=(SteeringFeature(CAT, 1.0, sae="nope"),)), None, SaeNotAttachedError, "nope"),
        (SteeringSpec(features=(SteeringFeature(256, 1.0, sae=EARLY),)), None, InvalidFeatureIndexError, "256"),
        (SteeringSpec(features=(SteeringFeature(CAT, 1.0, sae=EARLY),), mode="clamp", layers=(1, 3)), None,
         InvalidSteeringError, "SAE early: steering layers apply to additive"),
        (SteeringSpec(features=()), SteeringConditions(abort_when=(FeatureCondition(CAT, above=1.0, sae="gone"),)),
         SaeNotAttachedError, "gone"),
        (SteeringSpec(features=()), SteeringConditions(features=(
            ConditionalFeature(3, 1.0, FeatureCondition(300, above=1.0, sae=EARLY)),)), InvalidFeatureIndexError, "300"),
        (SteeringSpec(features=()), SteeringConditions(features=(
            ConditionalFeature(3, 1.0, FeatureCondition(CAT, above=float("nan"), sae=EARLY)),)), InvalidSteeringError,
         "finite"),
    ]
    for spec, conditions, error, words in bad:
        with pytest.raises(error, match=words):
            runtime.set_active_steering(spec, label="inline", conditions=conditions)
        assert runtime.active_steering is before and runtime.active_label == "active"
    runtime.set_active_steering(SteeringSpec(features=()), label="none")


def test_a_request_gets_the_features_of_the_sae_it_names_and_monitoring_frames_name_the_default(runtime):
    from engine.request_features import FeatureRequest

    prompt_ids = list(runtime.loaded.tokenizer(PROMPT)["input_ids"])
    encoded = {}
    for name in (LATE, EARLY):
        weights, kept = sae(runtime, name), []
        layer = decoder_layers(runtime.loaded.model)[weights.hook_layer]

        def work(layer=layer, weights=weights, kept=kept):
            handle = layer.register_forward_hook(lambda _m, _a, out: kept.append(out[0] if isinstance(out, tuple)
                                                                                 else out))
            try:
                runtime.loaded.model(torch.tensor([prompt_ids]))
            finally:
                handle.remove()
            return weights.encode(kept[0][0])

        encoded[name] = runtime.scheduler.call(work).result()
    submitted = runtime.submit(request_id="features-early", model=None, prompt=PROMPT, messages=None,
                               params={"max_tokens": 2, "temperature": 0.0}, steering=None, monitor=True,
                               features=FeatureRequest(top_k=3, positions="prompt", sae=EARLY))
    returned, monitored = [], []
    for event in submitted.handle:
        if isinstance(event, TokenEvent):
            returned += submitted.features.frames(event.token_id, event.captures)
            monitored += submitted.frames.frames(event.token_id, event.captures)
    assert [f["position"] for f in returned] == list(range(len(prompt_ids)))
    for frame in returned:  # the early SAE's top 3 at each prompt token
        values, indices = torch.topk(encoded[EARLY][frame["position"]], 3)
        expected = {str(i): round(v, 4) for i, v in zip(indices.tolist(), values.tolist(), strict=True) if v > 0}
        assert frame["features"].keys() == expected.keys()
        for index, value in expected.items():
            assert frame["features"][index] == pytest.approx(value, abs=1e-3)
    # Monitoring frames come from both SAEs (tests/engine/test_multi_sae_frames.py); the default's read "late".
    assert {f["sae"] for f in monitored} == {LATE, EARLY}
    prompt_frames = [f for f in monitored if f["type"] == "prompt" and f["sae"] == LATE]
    assert prompt_frames
    for frame in prompt_frames:
        best = encoded[LATE][frame["position"]]
        if frame["features"]:
            assert int(max(frame["features"], key=frame["features"].get)) == int(best.argmax())
        else:
            assert float(best.max()) <= 0  # nothing fired there
    with pytest.raises(SaeNotAttachedError):
        runtime.submit(request_id="features-gone", model=None, prompt=PROMPT, messages=None, params={"max_tokens": 1},
                       steering=None, features=FeatureRequest(top_k=3, sae="gone"))
    with pytest.raises(InvalidFeatureIndexError):
        runtime.submit(request_id="features-bad", model=None, prompt=PROMPT, messages=None, params={"max_tokens": 1},
                       steering=None, features=FeatureRequest(top_k=3, features=(256,), sae=EARLY))
