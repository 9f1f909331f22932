"""Steering spread over several layers (SteeringSpec.layers) on a real tiny Llama, against hand-made deltas."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.interceptors import ForwardContext, RowInfo
from engine.sae import SaeWeights
from engine.sae_hook import SaeHook
from engine.steering import InvalidSteeringError, SteeringFeature, SteeringSpec, compile_steering
from engine.steering_layers import LayerSteeringHook, residual_norms

HIDDEN, LAYERS, D_SAE, LAYER = 32, 4, 16, 2


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, vocab_size=128)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def sae() -> SaeWeights:
    generator = torch.Generator().manual_seed(1)
    return SaeWeights(architecture="standard", hook_name=f"blocks.{LAYER}.hook_resid_post", hook_layer=LAYER,
                      W_enc=torch.randn(HIDDEN, D_SAE, generator=generator),
                      b_enc=torch.zeros(D_SAE), W_dec=torch.randn(D_SAE, HIDDEN, generator=generator),
                      b_dec=torch.zeros(HIDDEN))


@pytest.fixture
def hooks(model, sae):
    sae_hook, layer_hook = SaeHook(), LayerSteeringHook()
    attached = sae_hook.attach(model, sae)
    layer_hook.attach(model)
    yield sae_hook, layer_hook, attached
    sae_hook.detach()
    layer_hook.detach()


NORMS = [1.0, 2.0, 4.0, 8.0]  # made-up residual norms per layer: scales are exact powers of two


def spread(*layers: int, strength: float = 3.0, positions: str = "all") -> SteeringSpec:
    return SteeringSpec(features=(SteeringFeature(5, strength),), positions=positions, layers=layers)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_each_layer_gets_the_delta_scaled_to_its_norm(sae):
    compiled = compile_steering(sae, spread(0, 2, 3), layer_norms=NORMS)
    delta = 3.0 * sae.W_dec[5]
    # Layer 2 is the SAE's own: n_2/n_2 = 1. Layer 0: 1/4 of it, layer 3: twice it.
    torch.testing.assert_close(compiled.additive_delta, delta)
    assert sorted(compiled.other_layers) == [0, 3]
    torch.testing.assert_close(compiled.other_layers[0].additive_delta, delta * 0.25)
    torch.testing.assert_close(compiled.other_layers[3].additive_delta, delta * 2.0)
    # Without the SAE's own layer, nothing is added there.
    assert not compile_steering(sae, spread(1), layer_norms=NORMS).additive_delta.any()


def test_spread_steering_equals_adding_each_delta_by_hand(model, hooks):
    sae_hook, layer_hook, attached = hooks
    ids = torch.arange(12).reshape(2, 6) % 120 + 3
    compiled = compile_steering(attached, spread(0, 2, 3), layer_norms=NORMS)
    rows = (RowInfo("a", compiled, False), RowInfo("b", None, False))  # the second row is not steered
    context = ForwardContext(rows=rows, generated_mask=torch.zeros(2, 6, dtype=torch.bool),
                             valid_mask=torch.ones(2, 6, dtype=torch.bool))
    for hook in (sae_hook, layer_hook):
        hook.set_context(context)
    steered = logits(model, ids)
    for hook in (sae_hook, layer_hook):
        hook.set_context(None)
    plain = logits(model, ids)  # hooks attached, no steering: the model as it is

    delta = 3.0 * attached.W_dec[5]
    manual = [model.model.layers[layer].register_forward_hook(
        lambda _m, _a, out, scale=scale: out + torch.stack([delta * scale, torch.zeros_like(delta)])[:, None])
        for layer, scale in ((0, 0.25), (2, 1.0), (3, 2.0))]
    try:
        expected = logits(model, ids)
    finally:
        for handle in manual:
            handle.remove()
    torch.testing.assert_close(steered, expected)
    assert torch.equal(steered[1], plain[1])  # the unsteered row is untouched, bit for bit
    assert not torch.allclose(steered[0], plain[0])


def test_generated_only_spread_leaves_the_prompt_alone(model, hooks):
    sae_hook, layer_hook, attached = hooks
    ids = torch.arange(6).reshape(1, 6) + 3
    compiled = compile_steering(attached, spread(0, 3, positions="generated_only"), layer_norms=NORMS)
    generated = torch.tensor([[False] * 4 + [True] * 2])
    context = ForwardContext(rows=(RowInfo("a", compiled, False),), generated_mask=generated,
                             valid_mask=torch.ones(1, 6, dtype=torch.bool))
    for hook in (sae_hook, layer_hook):
        hook.set_context(context)
    steered = logits(model, ids)
    for hook in (sae_hook, layer_hook):
        hook.set_context(None)
    plain = logits(model, ids)
    # Causal attention: the prompt positions (0..3) see no steered position.
    assert torch.equal(steered[0, :4], plain[0, :4])
    assert not torch.allclose(steered[0, 4:], plain[0, 4:])


def test_detach_restores_the_model_exactly(model, sae):
    ids = torch.arange(6).reshape(1, 6) + 3
    before = logits(model, ids)
    hook = LayerSteeringHook()
    hook.attach(model)
    hook.set_default_steering(compile_steering(sae, spread(0, 1), layer_norms=NORMS))
    assert not torch.allclose(logits(model, ids), before)
    hook.detach()
    assert torch.equal(logits(model, ids), before)


def test_residual_norms_are_the_median_norm_after_each_layer(model):
    ids = list(range(3, 13))
    seen = []
    handles = [layer.register_forward_hook(lambda _m, _a, out: seen.append(out[0, 1:].norm(dim=-1).median()))
               for layer in model.model.layers]
    try:
        norms = residual_norms(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    assert norms == pytest.approx([float(x) for x in seen])
    assert len(norms) == LAYERS and all(n > 0 for n in norms)


@pytest.mark.parametrize("bad, message", [
    (SteeringSpec(features=(SteeringFeature(1, 1.0),), mode="clamp", layers=(0,)), "additive"),
    (spread(0, 0), "distinct"),
    (spread(7), r"\[0, 4\)"),
    (spread(-1), r"\[0, 4\)"),
])
def test_bad_layers_are_refused(sae, bad, message):
    with pytest.raises(InvalidSteeringError, match=message):
        compile_steering(sae, bad, layer_norms=NORMS)


def test_spread_without_norms_is_a_clear_error(sae):
    with pytest.raises(InvalidSteeringError, match="residual norms"):
        compile_steering(sae, spread(0, 2))


def test_the_runtime_steers_over_layers_and_detach_forgets_the_norms(test_tier_assets):
    from engine.generation import FinishEvent, GenerationRequest
    from engine.runtime import EngineRuntime
    from engine.sampling import SamplingParams

    runtime = EngineRuntime()
    runtime.load(name="tiny", path=str(test_tier_assets.model.local_path))
    try:
        def generate(steering=None) -> list[int]:
            handle = runtime.scheduler.submit(GenerationRequest(
                "The cat", SamplingParams(max_tokens=6, temperature=0.0), steering=steering))
            return [e.token_id for e in handle if not isinstance(e, FinishEvent)]

        plain = generate()
        sae = runtime.attach_sae(name="sae", path=str(test_tier_assets.sae.local_path))
        layers = len(runtime.layer_norms)
        assert layers == runtime.loaded.model.config.num_hidden_layers and all(n > 0 for n in runtime.layer_norms)
        others = tuple(n for n in range(layers) if n != sae.hook_layer)
        compiled = runtime.compile(SteeringSpec(features=(SteeringFeature(7, 80.0),), layers=others))
        assert not compiled.additive_delta.any() and sorted(compiled.other_layers) == list(others)
        assert generate(compiled) != plain  # only the other layers steer, and they do
        assert generate() == plain
        with pytest.raises(InvalidSteeringError, match="no concept directions"):  # the test tier ships none
            runtime.compile(SteeringSpec(features=(SteeringFeature(7, 1.0),), direction="concept"))
        runtime.detach_sae()
        # The layer hook stays attached without an SAE: steering vectors (engine/control_vectors.py) use it.
        assert runtime.layer_norms is None and runtime.layer_hook.attached
        assert generate() == plain
    finally:
        runtime.unload()
