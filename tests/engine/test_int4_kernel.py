"""miLLM's own int4 CPU kernel (engine/int4_kernel.py): the math, batch independence, the fallback."""

from __future__ import annotations

import pytest
import torch

from engine import int4_kernel, quantization
from engine.loading import load_model
from engine.quantization import GROUP_SIZE, QuantizedLinear

needs_kernel = pytest.mark.skipif(not int4_kernel.available(),
                                  reason="this CPU has no AVX-512 BF16 or no C compiler: Q4 uses torch's kernel")


def _layer(out_features: int, in_features: int, seed: int = 0) -> tuple[torch.nn.Linear, QuantizedLinear]:
    torch.manual_seed(seed)
    dense = torch.nn.Linear(in_features, out_features, bias=False)
    dense.weight.data.normal_(0, 0.05)
    return dense, QuantizedLinear(dense, "q4")


def _quantized_reference(dense: torch.nn.Linear) -> torch.Tensor:
    """ŵ computed here from the formula in engine/quantization.py, independently of any packing."""
    n, k = dense.weight.shape
    groups = dense.weight.detach().reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-6).to(torch.bfloat16).float()
    zero = (low + 8 * scale).to(torch.bfloat16).float()
    q = ((groups - zero) / scale + 8).round().clamp(0, 15)
    return ((q - 8) * scale + zero).reshape(n, k)


@needs_kernel
@pytest.mark.parametrize(("out_features", "in_features"), [(96, 128), (100, 64), (960, 576), (576, 1536)])
@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_the_kernel_multiplies_bf16_activations_by_the_quantized_weights(out_features, in_features, rows):
    dense, layer = _layer(out_features, in_features)
    assert layer.own_kernel
    x = torch.randn(rows, in_features) * 3
    with torch.inference_mode():
        y = layer(x)
    reference = _quantized_reference(dense)
    assert torch.equal(layer.weight, reference)  # unpacking the kernel's layout gives back ŵ exactly
    exact = x.to(torch.bfloat16).double() @ reference.double().T
    assert y.dtype == torch.float32 and y.shape == (rows, out_features)
    # float32 sums of exact bf16 × int4 products: ~1e-6 of the output's scale (torch's kernel rounds to bf16, ~4e-3)
    assert (y.double() - exact).abs().max() < 2e-5 * exact.abs().max()


@needs_kernel
def test_a_row_gets_the_same_bits_alone_or_in_any_batch():
    _, layer = _layer(200, 256)
    rows = torch.randn(13, 256) * torch.logspace(-3, 3, 13).unsqueeze(1)
    with torch.inference_mode():
        alone = torch.cat([layer(rows[i : i + 1]) for i in range(13)])
        for size in (2, 5, 8, 13):
            batched = torch.cat([layer(rows[i : i + size]) for i in range(0, 13, size)])
            assert torch.equal(batched, alone), size


@needs_kernel
def test_the_q4_model_gives_each_prompt_the_same_logits_alone_or_batched(test_tier_assets):
    loaded = load_model(test_tier_assets.model.local_path, quantization="q4")
    assert loaded.kernel == int4_kernel.NAME
    torch.manual_seed(0)
    ids = torch.randint(3, loaded.model.config.vocab_size, (8, 9))
    with torch.inference_mode():
        batch = loaded.model(ids).logits
        alone = torch.cat([loaded.model(ids[i : i + 1]).logits for i in range(8)])
    assert torch.equal(batch, alone)


def test_without_the_kernel_q4_runs_on_torchs_and_says_so(monkeypatch, test_tier_assets):
    # MILLM_INT4_KERNEL=torch, a CPU without AVX-512 BF16 or a machine without a compiler all end here.
    monkeypatch.setattr(int4_kernel, "available", lambda: False)
    dense, layer = _layer(96, 128)
    assert not layer.own_kernel and layer.packed_weight.shape == (96, 64)
    x = torch.randn(4, 128)
    with torch.inference_mode():
        y = layer(x)
    exact = x.to(torch.bfloat16).float() @ _quantized_reference(dense).T
    assert torch.allclose(y, exact, atol=0.02 * exact.abs().max().item())
    loaded = load_model(test_tier_assets.model.local_path, quantization="q4")
    assert loaded.kernel == quantization.KERNELS["q4"] and "torch int4" in loaded.variant


def test_a_cpu_without_avx512_bf16_is_not_offered_the_kernel(monkeypatch, tmp_path):
    monkeypatch.setattr(int4_kernel, "_cpu_flags", lambda: {"avx2", "fma", "avx512f"})
    monkeypatch.setenv("MILLM_KERNEL_CACHE", str(tmp_path))
    int4_kernel._library.cache_clear()
    try:
        assert not int4_kernel.available()
        assert not list(tmp_path.iterdir())  # nothing was built
    finally:
        int4_kernel._library.cache_clear()


@needs_kernel
def test_the_kernel_is_built_once_into_its_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MILLM_KERNEL_CACHE", str(tmp_path))
    int4_kernel._library.cache_clear()
    try:
        assert int4_kernel.available()
        built = list(tmp_path.glob("int4_avx512-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        int4_kernel._library.cache_clear()
        assert int4_kernel.available() and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    finally:
        int4_kernel._library.cache_clear()
