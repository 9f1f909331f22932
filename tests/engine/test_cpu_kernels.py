"""miLLM's own Q4/Q8 CPU kernels (engine/cpu_kernels.py): the math, batch independence, the fallback."""

from __future__ import annotations

import pytest
import torch

from engine import cpu_kernels, quantization
from engine.loading import load_model
from engine.quantization import GROUP_SIZE, QuantizedLinear

needs_kernel = pytest.mark.skipif(not cpu_kernels.available("q4"),
                                  reason="this CPU has no AVX-512 VNNI or no C compiler: Q4 uses torch's kernel")
needs_vnni = pytest.mark.skipif(not cpu_kernels.available("q8"),
                                reason="this CPU has no AVX-512 VNNI or no C compiler: Q8 uses torch's kernel")


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
def test_the_kernel_multiplies_int8_activations_by_the_quantized_weights(out_features, in_features, rows):
    dense, layer = _layer(out_features, in_features)
    assert layer.own_kernel
    x = torch.randn(rows, in_features) * 3
    with torch.inference_mode():
        y = layer(x)
    reference = _quantized_reference(dense)
    assert torch.equal(layer.weight, reference)  # unpacking the kernel's layout gives back ŵ exactly
    exact = cpu_kernels.quantize_activations(x) @ reference.double().T
    assert y.dtype == torch.float32 and y.shape == (rows, out_features)
    # exact int8 × int4 sums, scaled and added in float32: ~1e-6 of the output's scale
    assert (y.double() - exact).abs().max() < 2e-5 * exact.abs().max()


@needs_kernel
def test_an_outlier_input_costs_precision_only_in_its_own_group_of_32():
    # Rounding x to int8 moves each input by at most half its group's step, max|x| / 254; with a step per
    # row, one outlier (LLM residuals have them) would round every other input of its row to 0.
    dense, layer = _layer(64, 256)
    x = torch.randn(6, 256)
    x[:, 37] = 1000.0
    with torch.inference_mode():
        y = layer(x)
    reference = _quantized_reference(dense).double()
    steps = x.reshape(6, 8, 32).abs().amax(-1).double().repeat_interleave(32, dim=1) / 127
    bound = (steps / 2) @ reference.abs().T  # per output: Σ_k step_k / 2 · |ŵ_k|
    error = (y.double() - x.double() @ reference.T).abs()
    assert (error <= bound * 1.001 + 1e-4).all()
    assert bound.max() < 0.3 * (x.double() @ reference.T).abs().max()  # the bound is tight enough to mean something


@needs_kernel
def test_non_finite_inputs_give_nan_outputs_not_numbers():
    _, layer = _layer(32, 64)
    x = torch.randn(3, 64)
    x[1, 5], x[2, 40] = float("nan"), float("inf")
    with torch.inference_mode():
        y = layer(x)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all() and torch.isnan(y[2]).all()


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
    assert loaded.kernel.startswith(cpu_kernels.NAMES["q4"])
    torch.manual_seed(0)
    ids = torch.randint(3, loaded.model.config.vocab_size, (8, 9))
    with torch.inference_mode():
        batch = loaded.model(ids).logits
        alone = torch.cat([loaded.model(ids[i : i + 1]).logits for i in range(8)])
    assert torch.equal(batch, alone)


def test_without_the_kernel_q4_runs_on_torchs_and_says_so(monkeypatch, test_tier_assets):
    # MILLM_CPU_KERNELS=torch, a CPU without AVX-512 VNNI or a machine without a compiler all end here.
    monkeypatch.setattr(cpu_kernels, "available", lambda quantization="q4": False)
    dense, layer = _layer(96, 128)
    assert not layer.own_kernel and layer.packed_weight.shape == (96, 64)
    x = torch.randn(4, 128)
    with torch.inference_mode():
        y = layer(x)
    exact = x.to(torch.bfloat16).float() @ _quantized_reference(dense).T
    assert torch.allclose(y, exact, atol=0.02 * exact.abs().max().item())
    loaded = load_model(test_tier_assets.model.local_path, quantization="q4")
    assert loaded.kernel == quantization.KERNELS["q4"] and "torch int4" in loaded.variant


def test_a_cpu_without_avx512_is_not_offered_the_kernels(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setenv("MILLM_KERNEL_CACHE", str(tmp_path))
    cpu_kernels._library.cache_clear()
    try:
        assert not cpu_kernels.available("q4") and not cpu_kernels.available("q8")
        assert not list(tmp_path.iterdir())  # nothing was built
        monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"})
        assert not cpu_kernels.available("q4")  # no VNNI: Q4 stays on torch's kernel
    finally:
        cpu_kernels._library.cache_clear()


@needs_kernel
def test_the_kernel_is_built_once_into_its_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MILLM_KERNEL_CACHE", str(tmp_path))
    cpu_kernels._library.cache_clear()
    try:
        assert cpu_kernels.available("q4")
        built = list(tmp_path.glob("avx512_kernels-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        cpu_kernels._library.cache_clear()
        assert cpu_kernels.available("q4") and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    finally:
        cpu_kernels._library.cache_clear()


def test_millm_cpu_kernels_torch_keeps_torchs_kernels(monkeypatch):
    monkeypatch.setenv("MILLM_CPU_KERNELS", "torch")
    cpu_kernels._library.cache_clear()
    try:
        assert not cpu_kernels.available("q4") and not cpu_kernels.available("q8")
        assert quantization.kernel_name("q4") == quantization.KERNELS["q4"]
        assert quantization.kernel_name("q8") == quantization.KERNELS["q8"]
    finally:
        cpu_kernels._library.cache_clear()


def _q8_pair(out_features: int, in_features: int, monkeypatch) -> tuple[QuantizedLinear, QuantizedLinear]:
    torch.manual_seed(0)
    dense = torch.nn.Linear(in_features, out_features, bias=True)
    ours = QuantizedLinear(dense, "q8")
    with monkeypatch.context() as patch:
        patch.setattr(quantization, "uses_own_kernel", lambda q: False)
        torchs = QuantizedLinear(dense, "q8")
    return ours, torchs


@needs_vnni
@pytest.mark.parametrize(("out_features", "in_features"), [(96, 128), (100, 64), (960, 576), (576, 1536)])
def test_the_q8_kernel_gives_torchs_w8a8_bits(out_features, in_features, monkeypatch):
    # Same integer sums, same float operations in the same order: torch._int_mm(q, w).div(inverse).mul_(scale).
    ours, torchs = _q8_pair(out_features, in_features, monkeypatch)
    assert ours.own_kernel and not torchs.own_kernel
    assert torch.equal(ours.weight, torchs.weight)
    for rows in (1, 3, 8, 13):
        x = torch.randn(rows, in_features) * torch.logspace(-3, 3, rows).unsqueeze(1)
        with torch.inference_mode():
            assert torch.equal(ours(x), torchs(x)), rows
    with torch.inference_mode():
        assert torch.equal(ours(torch.zeros(2, in_features)), torchs(torch.zeros(2, in_features)))


@needs_vnni
def test_the_q8_model_on_the_kernel_says_so(test_tier_assets):
    loaded = load_model(test_tier_assets.model.local_path, quantization="q8")
    assert loaded.kernel.startswith(cpu_kernels.NAMES["q8"]) and "VNNI" in loaded.variant


needs_layers = pytest.mark.skipif(not cpu_kernels.available("layers"),
                                  reason="this CPU has no AVX-512F or no C compiler: greedy sampling uses torch's argmax")


def _logits_with_edge_rows(rows: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator) * 10
    if rows > 1:  # a tie for the largest value: the first index wins
        logits[1, vocab // 3] = logits[1, vocab - 1] = logits[1].max() + 1
    if rows > 2:  # every value −inf: index 0, as torch says
        logits[2] = -torch.inf
    if rows > 3 and vocab > 2:  # +inf, twice
        logits[3, 1] = logits[3, vocab - 1] = torch.inf
    if rows > 4 and vocab > 1:  # the largest is zero, −0 before +0: equal, so the first
        logits[4] = -1.0
        logits[4, vocab // 2] = -0.0
        logits[4, vocab - 1] = 0.0
    return logits


@needs_layers
@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 49152, 50257])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_the_argmax_kernel_gives_torchs_indices(rows, vocab):
    logits = _logits_with_edge_rows(rows, vocab, seed=rows * 1000 + vocab)
    ids = cpu_kernels.argmax(logits)
    assert ids is not None and ids.dtype == torch.long
    assert ids.tolist() == logits.argmax(dim=-1).tolist()
    wider = torch.zeros(logits.shape[0], vocab + 7)
    wider[:, 3 : 3 + vocab] = logits  # rows further apart than their length: a view, not a copy
    assert cpu_kernels.argmax(wider[:, 3 : 3 + vocab]).tolist() == logits.argmax(dim=-1).tolist()


@needs_layers
def test_the_argmax_kernel_leaves_nans_and_other_tensors_to_torch():
    logits = torch.randn(3, 100)
    logits[1, 40] = torch.nan
    assert cpu_kernels.argmax(logits) is None
    assert cpu_kernels.argmax(torch.randn(2, 100, dtype=torch.float64)) is None
    assert cpu_kernels.argmax(torch.randn(2, 100).T) is None  # features not contiguous
    assert cpu_kernels.argmax(torch.randn(2, 3, 100)) is None


@needs_layers
def test_greedy_sampling_runs_on_the_argmax_kernel_and_keeps_torchs_answer(monkeypatch):
    from engine.sampling import SamplingBatch, SamplingParams, sample_next

    calls = []
    kernel = cpu_kernels.argmax
    monkeypatch.setattr(cpu_kernels, "argmax", lambda x: calls.append(x.shape) or kernel(x))
    assert cpu_kernels.built()
    logits = _logits_with_edge_rows(8, 49152, seed=7)
    batch = SamplingBatch.build([SamplingParams(temperature=0.0)] * 8, [1] * 8, torch.device("cpu"))
    sampled = sample_next(logits, batch, torch.zeros(8, dtype=torch.long))
    assert calls == [(8, 49152)]
    assert sampled.token_ids.tolist() == logits.argmax(dim=-1).tolist()
    logits[5, 9] = torch.nan  # the kernel declines: torch's argmax, which takes the NaN
    assert sample_next(logits, batch, torch.zeros(8, dtype=torch.long)).token_ids[5].item() == 9
