"""`layers` (steering spread over decoder layers) with features of several SAEs, on the test tier ("late" after
block 2, the default; "early" after block 1): every SAE's features are spread as the default SAE's are, each
scaled from its own SAE's layer, and the residual after each layer is what adding the hand-computed sum of both
SAEs' deltas gives."""

from __future__ import annotations

import pytest
import torch

from engine.control_vectors import VectorSteeringSpec, layer_vector, steering_control_vector
from engine.errors import InvalidSteeringError
from engine.generation import TokenEvent
from engine.sae import decoder_layers
from engine.steering import SteeringFeature, SteeringSpec
from tests.engine.two_saes import EARLY, LATE, two_sae_runtime

CAT = 7  # ' cat' in both test-tier SAEs
PROMPT = "The cat sat on the mat and the dog"
ALL_LAYERS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def runtime(test_tier_assets):
    yield from two_sae_runtime(test_tier_assets)


def residuals(runtime, steering=None, added=None, max_tokens=1):
    """Generate greedily, recording each layer's output at every pass; `added` {layer: (d,) tensor} is added to
    that layer's output by a plain forward hook first (the hand-made steering). ({layer: [outputs]}, ids)."""
    modules = decoder_layers(runtime.loaded.model)
    outputs = {layer: [] for layer in range(len(modules))}

    def add(_m, _a, out, delta):
        return (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta

    def keep(_m, _a, out, layer):
        outputs[layer].append((out[0] if isinstance(out, tuple) else out).clone())

    hooks = [(modules[layer], lambda m, a, o, d=delta: add(m, a, o, d)) for layer, delta in (added or {}).items()]
    hooks += [(modules[layer], lambda m, a, o, layer=layer: keep(m, a, o, layer)) for layer in outputs]
    handles = [runtime.scheduler.call(lambda module=module, hook=hook: module.register_forward_hook(hook)).result()
               for module, hook in hooks]
    try:
        events = list(runtime.submit(request_id=f"r{id(outputs)}", model=None, prompt=PROMPT, messages=None,
                                     params={"max_tokens": max_tokens, "temperature": 0.0}, steering=steering).handle)
    finally:
        for handle in handles:
            runtime.scheduler.call(handle.remove).result()
    return outputs, [e.token_id for e in events if isinstance(e, TokenEvent)]


def expected_deltas(runtime, features, layers):
    """By hand: at layer l, Σ over SAEs S of (n_l / n_{L_S}) · Σ_{i∈S} s_i W_dec_S[i] (float32)."""
    norms = runtime.layer_norms
    deltas = {}
    for layer in layers:
        total = torch.zeros(runtime.attached[LATE].sae.d_in)
        for feature in features:
            sae = runtime.attached[feature.sae or LATE].sae
            total += feature.strength * sae.W_dec[feature.index].float() * (norms[layer] / norms[sae.hook_layer])
        deltas[layer] = total
    return deltas


BOTH = (SteeringFeature(CAT, 2.0), SteeringFeature(42, 3.0, sae=EARLY))


@pytest.mark.parametrize("features, layers", [
    (BOTH, ALL_LAYERS),  # every layer, both SAEs' own among them
    (BOTH, (0, 3)),  # neither SAE's own layer: nothing is added at layers 1 and 2
    ((SteeringFeature(42, 3.0, sae=EARLY), SteeringFeature(CAT, -1.5, sae=EARLY)), (1, 2, 3)),  # the early SAE's only
])
def test_features_of_both_saes_add_their_scaled_deltas_at_every_layer_of_the_spread(runtime, features, layers):
    spec = SteeringSpec(features=features, layers=layers)
    steered, steered_ids = residuals(runtime, steering=spec, max_tokens=3)
    by_hand = expected_deltas(runtime, features, layers)
    expected, expected_ids = residuals(runtime, added=by_hand, max_tokens=3)
    plain, _ = residuals(runtime, max_tokens=3)
    for layer in ALL_LAYERS:
        for step, (got, want) in enumerate(zip(steered[layer], expected[layer], strict=True)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"layer {layer}, pass {step}")
    assert steered_ids == expected_ids
    # Each layer of the spread really moved: the first one by exactly its hand-computed delta.
    first = min(layers)
    torch.testing.assert_close(steered[first][0] - plain[first][0], by_hand[first].expand_as(plain[first][0]),
                               atol=1e-5, rtol=1e-5)
    for layer in ALL_LAYERS:
        if layer < first:
            assert torch.equal(steered[layer][0], plain[layer][0])


def test_each_sae_is_scaled_from_its_own_layer_and_its_own_layer_part_stays_with_its_hook(runtime):
    norms = runtime.layer_norms
    compiled = runtime.compile(SteeringSpec(features=BOTH, layers=ALL_LAYERS))
    late, early = runtime.attached[LATE].sae, runtime.attached[EARLY].sae
    late_delta, early_delta = 2.0 * late.W_dec[CAT], 3.0 * early.W_dec[42]
    # The late SAE's hook adds its part at layer 2, the early SAE's hook its part at layer 1 (n_L/n_L = 1).
    torch.testing.assert_close(compiled.additive_delta, late_delta)
    torch.testing.assert_close(compiled.saes[EARLY].additive_delta, early_delta)
    assert compiled.saes[EARLY].other_layers is None
    # The layer hook adds the rest: at layer 1 the late SAE's share, at layer 2 the early SAE's, both elsewhere.
    assert sorted(compiled.other_layers) == list(ALL_LAYERS)
    for layer in ALL_LAYERS:
        want = (late_delta * (norms[layer] / norms[2]) * (layer != 2)
                + early_delta * (norms[layer] / norms[1]) * (layer != 1))
        torch.testing.assert_close(compiled.other_layers[layer].additive_delta, want, atol=1e-6, rtol=1e-5)


def test_what_cannot_spread_is_refused_naming_the_sae(runtime):
    before = runtime.active_steering
    bad = [
        (SteeringSpec(features=(SteeringFeature(42, 1.0, sae=EARLY),), mode="clamp", layers=(1, 3)),
         "SAE early: steering layers apply to additive steering only"),
        (SteeringSpec(features=BOTH, layers=(1, 9)), r"\[0, 4\)"),
        (SteeringSpec(features=BOTH, layers=(1, 3), direction="concept"), "no concept directions"),
    ]
    for spec, words in bad:
        with pytest.raises(InvalidSteeringError, match=words):
            runtime.set_active_steering(spec, label="inline")
        assert runtime.active_steering is before


def test_both_saes_spread_steering_exports_as_one_control_vector_that_steers_the_same(runtime):
    """The export (a control vector per layer) carries every SAE's share, its own layer's part included."""
    spec = SteeringSpec(features=BOTH, layers=ALL_LAYERS)
    exported = steering_control_vector(runtime.compile(spec), sae_layer=2, model_hint="llama",
                                       part_layers={name: a.sae.hook_layer for name, a in runtime.attached.items()})
    by_hand = expected_deltas(runtime, BOTH, ALL_LAYERS)
    assert exported.layers == list(ALL_LAYERS)
    for layer in ALL_LAYERS:
        torch.testing.assert_close(torch.from_numpy(exported.directions[layer]), by_hand[layer], atol=1e-5, rtol=1e-5)
    served = VectorSteeringSpec(features=(), vectors=(layer_vector(exported),))
    assert residuals(runtime, steering=served, max_tokens=6)[1] == residuals(runtime, steering=spec, max_tokens=6)[1]
