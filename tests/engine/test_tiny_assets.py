"""The test-tier demo assets: deterministic, loadable offline, and their labelled features work.

No Django: run with `-p no:django` if the settings are not importable.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from engine.assets.manifest import DemoAssets
from engine.assets.tiny import (
    FEATURE_INDICES,
    HOOK_NAME,
    MANIFEST,
    RECIPE_VERSION,
    build_test_tier,
    load_test_tier,
    read_manifest,
)

# Chat and plain prompts; for each feature the steering test uses the first whose unsteered greedy
# text lacks the feature's word.
PROMPTS = (
    [{"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "Say something nice."}],
    "Once upon a time",
    "The king",
)
# Each feature word goes mid-sentence after " the", where it is one token with a leading space.
FIRING_TEXT = "In the morning the {word} was quiet and the old road was long."


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> DemoAssets:
    return build_test_tier(tmp_path_factory.mktemp("tiny") / "test")


@pytest.fixture(scope="module")
def manifest(built: DemoAssets) -> dict[str, Any]:
    data = read_manifest(built.model.local_path.parent)
    assert data is not None
    return data


@pytest.fixture(scope="module")
def model_and_tokenizer(built: DemoAssets) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = built.model.local_path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


@pytest.fixture(scope="module")
def sae(built: DemoAssets) -> Any:
    from sae_lens import SAE

    return SAE.load_from_disk(built.sae.local_path)


def _dir_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def test_build_is_deterministic(built: DemoAssets, tmp_path: Path) -> None:
    first_root = built.model.local_path.parent
    second = build_test_tier(tmp_path / "again")
    first_files, second_files = _dir_files(first_root), _dir_files(tmp_path / "again")
    assert sorted(first_files) == sorted(second_files)
    for name, content in first_files.items():
        assert content == second_files[name], f"{name} differs between two builds"
    assert second.sae.labels == built.sae.labels
    first_manifest, second_manifest = read_manifest(first_root), read_manifest(tmp_path / "again")
    assert first_manifest is not None and second_manifest is not None
    first_manifest.pop("build_seconds"), second_manifest.pop("build_seconds")
    assert first_manifest == second_manifest


def test_cached_build_is_reused_and_checked(built: DemoAssets, tmp_path: Path) -> None:
    root = built.model.local_path.parent
    weights = built.model.local_path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_test_tier(root) == built
    assert weights.stat().st_mtime_ns == stamp  # not rebuilt

    stale = tmp_path / "stale"
    shutil.copytree(root, stale)
    assert load_test_tier(stale) is not None
    data = json.loads((stale / MANIFEST).read_text())
    (stale / MANIFEST).write_text(json.dumps({**data, "recipe_version": "older"}))
    assert load_test_tier(stale) is None  # another recipe: rebuild

    partial = tmp_path / "partial"
    shutil.copytree(root, partial)
    (partial / "sae" / "sae_weights.safetensors").unlink()
    assert load_test_tier(partial) is None  # incomplete: rebuild
    assert load_test_tier(tmp_path / "missing") is None


def test_manifest_describes_the_build(built: DemoAssets, manifest: dict[str, Any]) -> None:
    assert manifest["recipe_version"] == RECIPE_VERSION
    assert built.model.repo_id == "millm/tiny-llama" and built.sae.repo_id == "millm/tiny-llama-sae"
    assert built.sae.hook_name == HOOK_NAME == f"blocks.{built.sae.layer}.hook_resid_post"
    assert 0 < built.sae.layer < built.model.num_layers - 1  # a middle layer
    assert built.sae.residual_norm == manifest["residual_norm_median"] > 0
    assert [f["index"] for f in manifest["features"]] == list(FEATURE_INDICES)
    assert [label.index for label in built.sae.labels] == list(FEATURE_INDICES)
    for feature, label in zip(manifest["features"], built.sae.labels, strict=True):
        assert label.label == f"token {feature['token']!r}" and label.description
        assert label.max_activation == feature["max_activation"]
        assert feature["max_activation"] >= feature["mean_activation"] > 0
        assert feature["occurrences"] >= 10 and feature["false_positive_rate"] < 0.01


def test_model_and_tokenizer_load_offline(built: DemoAssets, model_and_tokenizer: tuple[Any, Any]) -> None:
    model, tokenizer = model_and_tokenizer
    config = model.config
    assert config.model_type == "llama" and model.dtype == torch.float32
    assert config.hidden_size == built.model.hidden_size
    assert config.num_hidden_layers == built.model.num_layers
    assert config.max_position_embeddings == built.model.context_length
    assert sum(p.numel() for p in model.parameters()) == built.model.parameter_count
    assert config.vocab_size == len(tokenizer)
    assert 512 <= len(tokenizer) <= 2048
    assert config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert config.bos_token_id == tokenizer.bos_token_id
    assert config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.eos_token_id in model.generation_config.eos_token_id

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    assert ids["input_ids"][0, 0].item() == tokenizer.convert_tokens_to_ids(
        "<|im_start|>"
    )  # one special token
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    # Round trip of ordinary text through the byte-level BPE.
    sample = "The cat slept near the river, café ünïcode 123."
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample


def test_sae_loads_with_sae_lens(built: DemoAssets, sae: Any, model_and_tokenizer: tuple[Any, Any]) -> None:
    model, _ = model_and_tokenizer
    assert sae.cfg.architecture() == built.sae.architecture == "standard"
    assert sae.cfg.d_in == built.sae.d_in == model.config.hidden_size
    assert sae.cfg.d_sae == built.sae.d_sae
    assert sae.cfg.metadata.hook_name == built.sae.hook_name
    assert sae.cfg.metadata.model_name == built.model.repo_id
    on_disk = load_file(built.sae.local_path / "sae_weights.safetensors")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, name).detach(), on_disk[name])
    # sae-lens convention: unit-norm decoder rows.
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.d_sae), atol=1e-5)


@contextmanager
def _layer_hook(model: Any, layer: int, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """A forward hook on a decoder layer; its output is a tensor in transformers 5.x, a tuple before."""

    def hook(_module: Any, _args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        new = fn(hidden)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _residual(model: Any, layer: int, input_ids: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    with _layer_hook(model, layer, lambda h: seen.append(h.detach()) or None), torch.no_grad():
        model(input_ids=input_ids)
    return seen[0][0]


def test_labelled_features_fire_on_their_tokens(
    built: DemoAssets, manifest: dict[str, Any], sae: Any, model_and_tokenizer: tuple[Any, Any]
) -> None:
    model, tokenizer = model_and_tokenizer
    for feature in manifest["features"]:
        index, token_id = feature["index"], feature["token_id"]
        text = FIRING_TEXT.format(word=feature["token"].strip())
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        positions = (ids[0] == token_id).nonzero().flatten().tolist()
        assert len(positions) == 1, f"{feature['token']!r} is not one token in {text!r}"
        with torch.no_grad():
            acts = sae.encode(_residual(model, built.sae.layer, ids))
        at_token = acts[positions[0]]
        assert at_token[index] > 0.3 * feature["max_activation"], feature["token"]
        assert index in at_token.topk(3).indices.tolist(), feature["token"]
        others = torch.cat([acts[: positions[0], index], acts[positions[0] + 1 :, index]])
        assert (others > 0).float().mean() <= 0.1, f"{feature['token']!r} fires elsewhere: {others}"
    # The random features are sparse too: a handful active per token, not half the dictionary.
    ids = tokenizer(FIRING_TEXT.format(word="dog") * 3, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        active = (sae.encode(_residual(model, built.sae.layer, ids))[1:] > 0).sum(dim=1).float()
    assert 1 <= active.mean() <= 0.2 * sae.cfg.d_sae


def _generate(model: Any, tokenizer: Any, prompt: Any, new_tokens: int = 12) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer(prompt, return_tensors="pt")
    else:
        ids = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)
    return out[0, ids["input_ids"].shape[1] :].tolist()


def test_steering_with_a_decoder_row_makes_the_model_say_the_word(
    built: DemoAssets, manifest: dict[str, Any], sae: Any, model_and_tokenizer: tuple[Any, Any]
) -> None:
    model, tokenizer = model_and_tokenizer
    strength = manifest["steering_strength_hint"]
    assert strength == pytest.approx(2 * manifest["residual_norm_median"], rel=1e-3)
    baselines: dict[int, list[int]] = {}

    def baseline(i: int) -> list[int]:
        if i not in baselines:
            baselines[i] = _generate(model, tokenizer, PROMPTS[i])
        return baselines[i]

    for feature in manifest["features"]:
        token_id = feature["token_id"]
        choice = next((i for i in range(len(PROMPTS)) if token_id not in baseline(i)), None)
        assert choice is not None, f"every unsteered prompt already says {feature['token']!r}"
        delta = strength * sae.W_dec[feature["index"]].detach()
        with _layer_hook(model, built.sae.layer, lambda h, d=delta: h + d):
            steered = _generate(model, tokenizer, PROMPTS[choice])
        assert token_id in steered, f"{feature['token']!r} not in {tokenizer.decode(steered)!r}"
        # The hook is gone: the unsteered text comes back exactly.
        assert _generate(model, tokenizer, PROMPTS[choice]) == baselines[choice]
