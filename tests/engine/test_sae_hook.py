"""The SAE hook on a real (tiny, random) transformers Llama: steering, capture, attach/detach."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.interceptors import ForwardContext, RowInfo
from engine.sae import SaeIncompatibleError, SaeWeights
from engine.sae_hook import SaeHook, SaeNotAttachedError
from engine.steering import (
    InvalidFeatureIndexError,
    InvalidSteeringError,
    SteeringFeature,
    SteeringSpec,
)

HIDDEN, LAYERS, D_SAE, LAYER = 32, 3, 64, 1


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=128,
    )
    return LlamaForCausalLM(config).eval()


def random_sae(
    architecture: str = "standard", *, d_in: int = HIDDEN, layer: int = LAYER, **extra
) -> SaeWeights:
    generator = torch.Generator().manual_seed(1)
    return SaeWeights(
        architecture=architecture,
        hook_name=f"blocks.{layer}.hook_resid_post",
        hook_layer=layer,
        W_enc=torch.randn(d_in, D_SAE, generator=generator),
        b_enc=torch.randn(D_SAE, generator=generator) * 0.1,
        W_dec=torch.randn(D_SAE, d_in, generator=generator) * 0.3,
        b_dec=torch.randn(d_in, generator=generator) * 0.1,
        **extra,
    )


@pytest.fixture
def hook(model):
    hook = SaeHook(top_k=5)
    yield hook
    hook.detach()


def prompts(rows: int, length: int = 6) -> torch.Tensor:
    return torch.arange(rows * length).reshape(rows, length) % 120 + 3


def context(
    rows: list[RowInfo], valid: torch.Tensor, generated: torch.Tensor | None = None
) -> ForwardContext:
    generated = generated if generated is not None else torch.zeros_like(valid)
    return ForwardContext(rows=tuple(rows), generated_mask=generated, valid_mask=valid)


def logits(model, input_ids, attention_mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def layer_output_recorder(model) -> tuple[list[torch.Tensor], torch.utils.hooks.RemovableHandle]:
    """Records what leaves layer LAYER after every hook registered before it."""
    seen: list[torch.Tensor] = []
    handle = model.model.layers[LAYER].register_forward_hook(lambda _m, _a, out: seen.append(out.clone()))
    return seen, handle


def additive(*features: tuple[int, float], positions: str = "all") -> SteeringSpec:
    return SteeringSpec(features=[SteeringFeature(i, s) for i, s in features], positions=positions)


def test_additive_steering_equals_adding_delta_to_the_layer_output(model, hook):
    ids = prompts(2)
    sae = hook.attach(model, random_sae())
    compiled = hook.compile(additive((3, 4.0), (10, -2.5)))
    delta = compiled.additive_delta
    torch.testing.assert_close(delta, 4.0 * sae.W_dec[3] - 2.5 * sae.W_dec[10])

    hook.set_default_steering(compiled)
    steered_plain = logits(model, ids)
    hook.set_context(
        context(
            [RowInfo("a", compiled, False), RowInfo("b", compiled, False)], torch.ones(2, 6, dtype=torch.bool)
        )
    )
    steered_scheduled = logits(model, ids)
    hook.detach()

    manual = model.model.layers[LAYER].register_forward_hook(lambda _m, _a, out: out + delta)
    try:
        expected = logits(model, ids)
    finally:
        manual.remove()
    # Bit for bit: the hook adds the very same delta (times an exact 1.0 gate on the scheduled path).
    assert torch.equal(steered_plain, expected)
    assert torch.equal(steered_scheduled, expected)
    assert not torch.allclose(expected, logits(model, ids))  # the steering did change something


def test_each_row_gets_its_own_steering(model, hook):
    ids = prompts(3)
    hook.attach(model, random_sae())
    steer = hook.compile(additive((5, 3.0), (7, 1.5)))
    clamp = hook.compile(
        SteeringSpec(features=[SteeringFeature(2, 6.0), SteeringFeature(9, 0.0)], mode="clamp")
    )
    row_steering = [None, steer, clamp]
    everywhere = torch.ones(3, 6, dtype=torch.bool)
    hook.set_context(context([RowInfo(f"r{i}", s, False) for i, s in enumerate(row_steering)], everywhere))
    batched = logits(model, ids)
    for i, steering in enumerate(row_steering):
        hook.set_context(context([RowInfo("alone", steering, False)], everywhere[:1]))
        torch.testing.assert_close(batched[i : i + 1], logits(model, ids[i : i + 1]), rtol=1e-5, atol=1e-5)
        hook.set_context(context([RowInfo("unsteered", None, False)], everywhere[:1]))
        assert torch.allclose(batched[i], logits(model, ids[i : i + 1])[0], atol=1e-5) == (steering is None)


def test_detach_restores_the_original_logits_exactly(model, hook):
    ids = prompts(2)
    before = logits(model, ids)
    hook.attach(model, random_sae())
    hook.set_default_steering(hook.compile(additive((1, 8.0))))
    assert not torch.equal(logits(model, ids), before)
    hook.detach()
    assert not model.model.layers[LAYER]._forward_hooks
    assert torch.equal(logits(model, ids), before)


def test_generated_only_leaves_prompt_positions_untouched(model, hook):
    ids = prompts(1)
    plain, handle = layer_output_recorder(model)
    logits(model, ids)
    handle.remove()
    hook.attach(model, random_sae())
    compiled = hook.compile(additive((4, 5.0), positions="generated_only"))
    generated = torch.tensor([[False, False, False, False, True, True]])
    hook.set_context(context([RowInfo("g", compiled, False)], torch.ones(1, 6, dtype=torch.bool), generated))
    steered, handle = layer_output_recorder(model)  # registered after the SAE hook: sees its output
    logits(model, ids)
    handle.remove()
    assert torch.equal(steered[0][:, :4], plain[0][:, :4])
    torch.testing.assert_close(
        steered[0][:, 4:], plain[0][:, 4:] + compiled.additive_delta, rtol=0, atol=1e-6
    )


def test_monitoring_captures_topk_on_valid_positions_only(model):
    hook = SaeHook(top_k=4)
    sae = hook.attach(model, random_sae())
    hook.set_monitored_features([0, 17])
    # Row 0 is left-padded by two positions; row 1 is not monitored.
    ids = prompts(2)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[0, :2] = False
    generated = torch.zeros(2, 6, dtype=torch.bool)
    generated[0, 5] = True
    hook.set_context(
        context([RowInfo("watched", None, True), RowInfo("quiet", None, False)], valid, generated)
    )
    residual, handle = layer_output_recorder(model)
    logits(model, ids, attention_mask=valid.long())
    handle.remove()
    captures = hook.collect()
    hook.detach()

    assert set(captures) == {"watched"}
    capture = captures["watched"]
    assert capture.input_positions == [2, 3, 4, 5]
    assert capture.generated == [False, False, False, True]
    features = sae.encode(residual[0][0, 2:])  # (4, d_sae) at the valid positions
    expected_values, expected_indices = torch.topk(features, k=4, dim=-1)
    assert capture.topk_indices == expected_indices.tolist()
    torch.testing.assert_close(torch.tensor(capture.topk_values), expected_values)
    torch.testing.assert_close(torch.tensor(capture.monitored[17]), features[:, 17])
    torch.testing.assert_close(torch.tensor(capture.monitored[0]), features[:, 0])


def test_capture_after_steering_sees_the_steered_residual(model):
    hook = SaeHook(top_k=3, capture_after_steering=True)
    sae = hook.attach(model, random_sae())
    compiled = hook.compile(additive((11, 6.0)))
    hook.set_context(context([RowInfo("s", compiled, True)], torch.ones(1, 6, dtype=torch.bool)))
    steered, handle = layer_output_recorder(model)
    logits(model, prompts(1))
    handle.remove()
    capture = hook.collect()["s"]
    hook.detach()
    expected_values, expected_indices = torch.topk(sae.encode(steered[0][0]), k=3, dim=-1)
    assert capture.topk_indices == expected_indices.tolist()
    torch.testing.assert_close(torch.tensor(capture.topk_values), expected_values)


def test_statistics_follow_the_monitored_tokens(model):
    hook = SaeHook()
    sae = hook.attach(model, random_sae())
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, :3] = False
    hook.set_context(context([RowInfo("a", None, True), RowInfo("b", None, True)], valid))
    residual, handle = layer_output_recorder(model)
    logits(model, prompts(2), attention_mask=valid.long())
    handle.remove()
    assert hook.collect().keys() == {"a", "b"}
    stats = hook.statistics
    hook.detach()
    features = sae.encode(residual[0][valid])  # the 9 valid tokens
    assert stats.total_tokens == 9
    torch.testing.assert_close(stats.mean.float(), features.mean(dim=0))
    torch.testing.assert_close(stats.max.float(), features.amax(dim=0))


def test_collect_is_empty_without_monitored_rows_or_context(model, hook):
    hook.attach(model, random_sae())
    logits(model, prompts(1))
    assert hook.collect() == {}
    hook.set_context(context([RowInfo("x", None, False)], torch.ones(1, 6, dtype=torch.bool)))
    logits(model, prompts(1))
    assert hook.collect() == {}


def test_stale_context_is_a_clear_error(model, hook):
    hook.attach(model, random_sae())
    hook.set_context(context([RowInfo("x", None, False)], torch.ones(1, 6, dtype=torch.bool)))
    with pytest.raises(RuntimeError, match="set_context must be called before every forward pass"):
        logits(model, prompts(2))


def test_tuple_layer_outputs_are_handled(model, hook):
    sae = hook.attach(model, random_sae())
    hook.set_default_steering(hook.compile(additive((0, 1.0))))
    hidden = torch.zeros(1, 2, HIDDEN)
    extra = object()
    steered, passed_through = hook._on_layer_output(model.model.layers[LAYER], (), (hidden, extra))
    assert passed_through is extra
    torch.testing.assert_close(steered, hidden + sae.W_dec[0])


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (additive((D_SAE, 1.0)), InvalidFeatureIndexError),
        (additive((0, math.nan)), InvalidSteeringError),
        (additive((0, math.inf)), InvalidSteeringError),
    ],
)
def test_bad_steering_is_refused(model, hook, bad, error):
    hook.attach(model, random_sae())
    with pytest.raises(error):
        hook.compile(bad)


def test_bad_monitored_feature_is_refused(model, hook):
    hook.attach(model, random_sae())
    with pytest.raises(InvalidFeatureIndexError):
        hook.set_monitored_features([3, D_SAE])


@pytest.mark.parametrize(
    ("sae", "message"),
    [
        (random_sae(d_in=16), "d_in 16 does not match the model's hidden size 32"),
        (random_sae(layer=LAYERS), "layer 3 but the model has 3 layers"),
    ],
)
def test_incompatible_sae_is_refused_and_nothing_is_attached(model, hook, sae, message):
    hook.attach(model, random_sae())
    working = hook.sae
    with pytest.raises(SaeIncompatibleError, match=message):
        hook.attach(model, sae)
    assert hook.sae is working  # the previous attachment is untouched
    assert sum(len(layer._forward_hooks) for layer in model.model.layers) == 1
    hook.detach()
    with pytest.raises(SaeIncompatibleError):
        hook.attach(model, sae)
    assert not hook.attached
    assert sum(len(layer._forward_hooks) for layer in model.model.layers) == 0
    with pytest.raises(SaeNotAttachedError):
        hook.compile(additive((0, 1.0)))


# Loading through sae-lens ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sae_lens():
    import sae_lens  # ~10 s: only the tests below pay for it

    return sae_lens


def saved_sae_lens_sae(sae_lens, path, architecture: str, hook_name: str = "blocks.2.hook_resid_post", **cfg):
    classes = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
        "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig),
    }
    sae_class, config_class = classes[architecture]
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(3)
    sae = sae_class(config_class(d_in=HIDDEN, d_sae=D_SAE, metadata=SAEMetadata(hook_name=hook_name), **cfg))
    with torch.no_grad():  # sae-lens initialises biases and thresholds to zero: make them count
        for parameter in sae.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
        if architecture == "jumprelu":
            sae.threshold.abs_()
    sae.save_model(path)
    return sae


@pytest.mark.parametrize(
    ("architecture", "cfg"),
    [
        ("standard", {}),
        ("jumprelu", {}),
        ("topk", {"k": 5}),
        ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}),
    ],
)
def test_encode_matches_sae_lens_after_a_disk_round_trip(sae_lens, tmp_path, architecture, cfg):
    from engine.sae import load_sae

    reference = saved_sae_lens_sae(sae_lens, tmp_path, architecture, **cfg)
    loaded = load_sae(tmp_path)
    assert (loaded.architecture, loaded.hook_layer, loaded.d_in, loaded.d_sae) == (
        architecture,
        2,
        HIDDEN,
        D_SAE,
    )
    x = torch.randn(2, 7, HIDDEN)
    with torch.no_grad():
        expected = reference.encode(x)
        features = loaded.encode(x)
        torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
        assert (expected > 0).any() and (expected == 0).any()  # the activation function did something
        torch.testing.assert_close(loaded.decode(features), reference.decode(expected), rtol=1e-5, atol=1e-5)


def test_hook_layer_comes_from_the_hook_name(sae_lens, tmp_path):
    from engine.sae import UnsupportedSaeError, load_sae

    saved_sae_lens_sae(sae_lens, tmp_path / "pre", "standard", hook_name="blocks.2.hook_resid_pre")
    assert load_sae(tmp_path / "pre").hook_layer == 1  # resid_pre of block 2 = output of layer 1
    saved_sae_lens_sae(sae_lens, tmp_path / "attn", "standard", hook_name="blocks.2.attn.hook_z")
    with pytest.raises(UnsupportedSaeError, match="not a residual-stream hook"):
        load_sae(tmp_path / "attn")
    saved_sae_lens_sae(sae_lens, tmp_path / "gated", "gated")
    with pytest.raises(UnsupportedSaeError, match="'gated' is not supported"):
        load_sae(tmp_path / "gated")
    with pytest.raises(UnsupportedSaeError, match="no sae-lens cfg.json"):
        load_sae(tmp_path / "missing")
