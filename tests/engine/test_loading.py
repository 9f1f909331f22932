"""Loading the tiny test-tier model: facts, dtypes, Q4/Q8 via bitsandbytes, and the domain errors."""

from __future__ import annotations

import gc
import json
import shutil
import weakref

import pytest
import torch
from transformers import LlamaConfig

from engine.loading import (
    InvalidModelError,
    ModelLoadError,
    ModelNotFoundError,
    QuantizationUnavailableError,
    UnsupportedConfigurationError,
    estimate_memory_bytes,
    kv_cache_bytes_per_token,
    load_model,
    parameter_count_of,
)


@pytest.fixture(scope="module")
def model_dir(test_tier_assets):
    return test_tier_assets.model.local_path


def test_load_reports_the_model_facts(model_dir, test_tier_assets):
    loaded = load_model(model_dir)
    built = test_tier_assets.model
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert loaded.hidden_size == built.hidden_size and loaded.num_layers == built.num_layers
    assert loaded.context_length == built.context_length
    assert loaded.parameter_count == built.parameter_count
    assert loaded.vocab_size == len(loaded.tokenizer)
    assert loaded.eos_token_ids and loaded.tokenizer.eos_token_id in loaded.eos_token_ids
    assert loaded.device.type == "cpu" and loaded.dtype == "float32" and loaded.quantization is None
    assert abs(loaded.estimated_memory_bytes - loaded.memory_bytes) / loaded.memory_bytes < 0.02


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_half_precision_dtypes(model_dir, dtype, torch_dtype):
    loaded = load_model(model_dir, dtype=dtype)
    assert next(loaded.model.parameters()).dtype == torch_dtype
    assert loaded.memory_bytes < load_model(model_dir).memory_bytes


# bitsandbytes layers on CUDA; torch's own CPU kernels otherwise (tests/engine/test_quantization.py).
_QUANTIZED_LAYER = {"q8": "Linear8bitLt", "q4": "Linear4bit"} if torch.cuda.is_available() else None


@pytest.mark.parametrize("quantization", ["q8", "q4"])
def test_quantized_loading_works_or_says_what_does(model_dir, quantization):
    layer = _QUANTIZED_LAYER[quantization] if _QUANTIZED_LAYER else "FusedSlice"  # of a fused q/k/v
    try:
        loaded = load_model(model_dir, quantization=quantization.upper())
    except QuantizationUnavailableError as exc:  # the documented answer where bitsandbytes has no backend
        assert "float16" in str(exc)
        return
    assert loaded.quantization == quantization
    assert type(loaded.model.model.layers[0].self_attn.q_proj).__name__ == layer
    assert loaded.memory_bytes < load_model(model_dir).memory_bytes
    assert abs(loaded.estimated_memory_bytes - loaded.memory_bytes) / loaded.memory_bytes < 0.05
    ids = loaded.tokenizer("The cat", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = loaded.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False
        )
    assert out.shape[1] == ids.shape[1] + 4


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"dtype": "float64"}, UnsupportedConfigurationError, "dtype"),
        ({"quantization": "q3"}, UnsupportedConfigurationError, "quantization"),
        ({"quantization": "q4", "gguf_file": "model.gguf"}, UnsupportedConfigurationError, "GGUF"),
        ({"gguf_file": "missing.gguf"}, ModelNotFoundError, "GGUF file"),
    ],
)
def test_impossible_options_are_domain_errors(model_dir, kwargs, error, words):
    with pytest.raises(error, match=words):
        load_model(model_dir, **kwargs)


def test_missing_and_broken_folders(tmp_path, model_dir):
    with pytest.raises(ModelNotFoundError):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError):
        load_model(tmp_path / "nope" / "model.gguf")
    with pytest.raises(UnsupportedConfigurationError, match="GGUF"):  # checked before the file system
        load_model(tmp_path / "nope" / "model.gguf", quantization="q8")
    with pytest.raises(InvalidModelError, match="config.json"):
        load_model(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(InvalidModelError) as caught:
        load_model(broken)
    assert str(tmp_path) not in str(caught.value)  # no server paths in the message
    assert isinstance(caught.value, ModelLoadError)


def test_unload_frees_the_weights(model_dir):
    loaded = load_model(model_dir)
    model_ref = weakref.ref(loaded.model)
    loaded.unload()
    gc.collect()
    assert not loaded.loaded and model_ref() is None


def test_estimates_for_a_7b_llama():
    config = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    )  # fmt: skip
    parameters = parameter_count_of(config)
    assert 6.7e9 < parameters < 6.8e9  # Llama-2-7B has 6.74B
    fp16 = estimate_memory_bytes(config, "float16", None)
    q8 = estimate_memory_bytes(config, "float16", "q8")
    q4 = estimate_memory_bytes(config, "float16", "q4")
    assert fp16 == pytest.approx(2 * parameters, rel=1e-6)
    assert 6.5e9 < q8 < 7.5e9 and 3.5e9 < q4 < 4.3e9
    assert kv_cache_bytes_per_token(config, "float16") == 2 * 32 * 4096 * 2
    with pytest.raises(UnsupportedConfigurationError):
        estimate_memory_bytes(config, "int3", None)
