"""miLLM's one-token CPU attention (engine/attention.py, engine/kernels/avx512_attention.c): the math
against a float64 reference, padding independence, what it declines, and models that run on it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine import cpu_kernels
from engine import decode_kernels as attention
from engine.batch_cache import new_cache
from engine.generation import GenerationRequest
from engine.loading import load_model
from engine.sampling import SamplingParams
from engine.scheduler import GenerationScheduler
from tests.engine.test_generation import _prefill, _step
from tests.engine.test_scheduler import collect, ids_of

needs_kernel = pytest.mark.skipif(not cpu_kernels.available("attention"),
                                  reason="this CPU has no AVX-512 or no C compiler: attention stays on sdpa")
needs_q4_kernel = pytest.mark.skipif(not cpu_kernels.available("q4"), reason="Q4 runs on torch's kernel here")


def _reference(query, key, value, mask, scale):
    """softmax(q·kᵀ · scale) · v in float64, GQA by repeating the KV heads, mask True = attended."""
    group = query.shape[1] // key.shape[1]
    k = key.double().repeat_interleave(group, dim=1)
    v = value.double().repeat_interleave(group, dim=1)
    scores = query.double() @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)  # [B, 1, H, D]


def _inputs(batch, heads, kv_heads, dim, length, seed=0, headroom=7):
    """query [B, H, 1, D]; key/value as views of a larger buffer, like the preallocated KV cache."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, 1, dim, generator=generator) * 2
    key = torch.randn(batch, kv_heads, length + headroom, dim, generator=generator)[:, :, :length]
    value = torch.randn(batch, kv_heads, length + headroom, dim, generator=generator)[:, :, :length]
    return query, key, value


@needs_kernel
@pytest.mark.parametrize(("batch", "heads", "kv_heads", "dim"),
                         [(1, 4, 2, 16), (8, 9, 3, 64), (3, 8, 8, 128), (2, 4, 1, 256), (5, 6, 2, 48)])
@pytest.mark.parametrize("length", [1, 15, 16, 17, 160])
@pytest.mark.parametrize("masking", ["none", "padding", "window", "shared"])
def test_the_kernel_is_softmax_attention(batch, heads, kv_heads, dim, length, masking):
    query, key, value = _inputs(batch, heads, kv_heads, dim, length)
    mask = None
    if masking == "padding":  # left padding, a different amount per row; every row keeps its last column
        pads = torch.arange(batch) * length // (batch + 1)
        mask = (torch.arange(length).unsqueeze(0) >= pads.unsqueeze(1))[:, None, None, :]
    elif masking == "window":  # holes anywhere, as sliding windows and custom masks give
        mask = torch.rand(batch, 1, 1, length, generator=torch.Generator().manual_seed(1)) > 0.4
        mask[..., -1] = True
    elif masking == "shared":  # one mask row broadcast over the batch
        mask = (torch.arange(length) >= length // 3).expand(1, 1, 1, length)
    out = cpu_kernels.decode_attention(query, key, value, mask, dim**-0.5)
    assert out is not None and out.shape == (batch, 1, heads, dim) and out.dtype == torch.float32
    expected = _reference(query, key, value, mask, dim**-0.5)
    assert (out.double() - expected).abs().max() < 2e-6 * max(1.0, expected.abs().max().item())


@needs_kernel
def test_a_row_gets_the_same_bits_whatever_padding_its_batch_gives_it():
    query, key, value = _inputs(1, 9, 3, 64, 37)
    alone = cpu_kernels.decode_attention(query, key, value, None, 0.125)
    for pad in (1, 5, 16, 29):
        garbage = torch.randn(1, 3, pad, 64) * 100  # whatever the padding columns hold
        padded_key, padded_value = torch.cat([garbage, key], dim=2), torch.cat([garbage, value], dim=2)
        mask = (torch.arange(37 + pad) >= pad)[None, None, None, :]
        other = _inputs(1, 9, 3, 64, 37 + pad, seed=pad)  # another row in the same batch
        batched = cpu_kernels.decode_attention(
            torch.cat([other[0], query]), torch.cat([other[1], padded_key]), torch.cat([other[2], padded_value]),
            torch.cat([torch.ones_like(mask), mask]), 0.125)
        assert torch.equal(batched[1:], alone), pad


@pytest.mark.parametrize("case", ["two tokens", "float16", "float mask", "dim 40", "strided rows", "gpu-less dtype"])
def test_what_the_kernel_does_not_cover_goes_back_to_sdpa(case):
    query, key, value = _inputs(2, 4, 2, 64, 10)
    mask = None
    if case == "two tokens":
        query = torch.randn(2, 4, 2, 64)
    elif case == "float16":
        query, key, value = query.half(), key.half(), value.half()
    elif case == "float mask":
        mask = torch.zeros(2, 1, 1, 10)
    elif case == "dim 40":
        query, key, value = query[..., :40], key[..., :40], value[..., :40]
    elif case == "strided rows":
        key = key.transpose(-1, -2).contiguous().transpose(-1, -2)
    else:
        query, key, value = query.double(), key.double(), value.double()
    assert cpu_kernels.decode_attention(query, key, value, mask, 0.125) is None
    # ... and the attention function then runs transformers' sdpa, with the same result as sdpa itself
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    ours, _ = attention.millm_cpu_attention(module, query, key, value, mask, scaling=0.125)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.125)
    assert torch.equal(ours, theirs)


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many attention calls miLLM's kernel served (not sdpa)."""
    calls = []
    kernel = cpu_kernels.decode_attention

    def counted(*args):
        out = kernel(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(cpu_kernels, "decode_attention", counted)
    return calls


def _steps(model, batch, ids, count):
    """`count` greedy decode steps of a BatchKVCache batch: their logits [B, count, V]."""
    logits = []
    for _ in range(count):
        logits.append(_step(model, batch, ids))
        ids = logits[-1].argmax(-1)
    return torch.stack(logits, dim=1)


@needs_kernel
@needs_q4_kernel
def test_a_q4_row_decodes_the_same_bits_alone_or_padded_into_a_batch(test_tier_assets, kernel_calls):
    # miLLM's Q4 matmuls and this attention are both batch independent: so is a whole Q4 decode step
    loaded = load_model(test_tier_assets.model.local_path, quantization="q4")
    model = loaded.model
    assert model.config._attn_implementation == attention.NAME and attention.LABEL in loaded.variant
    long, short = list(range(30, 52)), [40, 41, 42]
    with torch.inference_mode():
        alone_short, first_short = _prefill(model, [short])
        alone_long, first_long = _prefill(model, [long])
        reference_short = _steps(model, alone_short, first_short, 6)
        reference_long = _steps(model, alone_long, first_long, 6)
        batch, first = _prefill(model, [short])
        joined, first_joined = _prefill(model, [long])
        batch.merge(joined)  # the short row is left-padded to the long one's width
        logits = _steps(model, batch, torch.cat([first, first_joined]), 6)
    assert torch.equal(logits[0], reference_short[0]) and torch.equal(logits[1], reference_long[0])
    assert kernel_calls and all(kernel_calls)  # every decode step's attention ran on the kernel, padded too


@needs_kernel
def test_float32_models_keep_sdpa_and_quantized_ones_say_which_attention_runs(test_tier_assets, monkeypatch):
    assert load_model(test_tier_assets.model.local_path).model.config._attn_implementation == "sdpa"
    monkeypatch.setattr(cpu_kernels, "available", lambda kernel="q4": kernel != "attention")
    loaded = load_model(test_tier_assets.model.local_path, quantization="q8")
    assert loaded.model.config._attn_implementation == "sdpa" and attention.LABEL not in loaded.variant


@needs_kernel
def test_a_sliding_window_model_on_the_kernel_batches_like_solo_runs_and_matches_sdpa(test_tier_assets,
                                                                                      kernel_calls):
    from transformers import MistralConfig, MistralForCausalLM

    tiny = load_model(test_tier_assets.model.local_path)
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=tiny.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           sliding_window=6)
    model = MistralForCausalLM(config).eval()
    prompts = ["The sea was calm", "A lighthouse keeper found a bottle and a long letter in it", "Why"]
    texts = {}
    for implementation in ("sdpa", attention.NAME):
        model.set_attn_implementation(implementation)
        engine = GenerationScheduler(dataclasses.replace(tiny, model=model, eos_token_ids=frozenset(),
                                                         context_length=256)).start()
        try:
            params = [SamplingParams(max_tokens=12 + 3 * i, temperature=0) for i in range(len(prompts))]
            solo = [ids_of(collect(engine.submit(GenerationRequest(p, q)))[0]) for p, q in zip(prompts, params, strict=True)]
            handles = [engine.submit(GenerationRequest(p, q)) for p, q in zip(prompts, params, strict=True)]
            assert [ids_of(collect(h)[0]) for h in handles] == solo, implementation
            texts[implementation] = solo
        finally:
            engine.stop()
    assert texts[attention.NAME] == texts["sdpa"]  # greedy, float32: the same tokens as transformers' sdpa
    assert sum(kernel_calls) > 100 and all(kernel_calls)  # sliding-window masks included


# --- RMSNorm and rotary --------------------------------------------------------------------------

needs_layers = pytest.mark.skipif(not cpu_kernels.available("layers"), reason="this CPU has no AVX-512")


@needs_layers
@pytest.mark.parametrize("dim", [16, 64, 576, 600, 7])
@pytest.mark.parametrize("shape", [(1, 1), (8, 1), (3, 5)])
def test_the_rms_norm_kernel_is_llamas_rms_norm(dim, shape):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(dim, eps=1e-5)
    norm.weight.data.normal_(1, 0.3)
    x = torch.randn(*shape, dim) * torch.logspace(-2, 2, dim)
    out = cpu_kernels.rms_norm(x, norm.weight.data, 1e-5)
    expected = x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * norm.weight.double()
    assert out.shape == x.shape and (out.double() - expected).abs().max() < 1e-5 * expected.abs().max()
    with torch.no_grad():
        assert torch.allclose(out, norm(x), rtol=1e-5, atol=1e-6)
    strided = torch.randn(*shape, dim + 9)[..., 5 : 5 + dim]  # rows further apart than their features
    torch.testing.assert_close(cpu_kernels.rms_norm(strided, norm.weight.data, 1e-5),
                               cpu_kernels.rms_norm(strided.contiguous(), norm.weight.data, 1e-5), rtol=0, atol=0)
    assert cpu_kernels.rms_norm(x.half(), norm.weight.data, 1e-5) is None


@needs_layers
@pytest.mark.parametrize(("batch", "heads", "dim"), [(1, 9, 64), (8, 3, 64), (2, 4, 16), (3, 2, 40), (2, 2, 6)])
def test_the_rotary_kernel_gives_transformers_bits(batch, heads, dim):
    from transformers.models.llama import modeling_llama

    original = getattr(modeling_llama.apply_rotary_pos_emb, "original", modeling_llama.apply_rotary_pos_emb)
    fused = torch.randn(batch, 1, 3 * heads * dim)  # q as the fused q/k/v output leaves it: rows 3·H·D apart
    q = fused[..., : heads * dim].view(batch, 1, heads, dim).transpose(1, 2)
    q[0, 0, 0, : dim // 2] = -0.0  # x = −0 and rotate_half(x) = −(+0): the sum is −0 where cos, sin > 0
    q[0, 0, 0, dim // 2 :] = 0.0
    k = torch.randn(batch, heads, 1, dim)
    positions = torch.randint(0, 4000, (batch, 1)).float()
    angles = positions.unsqueeze(-1) * torch.logspace(0, -4, dim // 2).repeat(2)
    cos, sin = angles.cos(), angles.sin()
    expected_q, expected_k = original(q, k, cos, sin)
    ours_q, ours_k = cpu_kernels.rotary(q, cos, sin), cpu_kernels.rotary(k, cos, sin)
    assert torch.equal(ours_q, expected_q) and torch.equal(ours_k, expected_k)
    assert torch.equal(ours_q.view(torch.int32), expected_q.contiguous().view(torch.int32))  # -0.0 too
    assert cpu_kernels.rotary(torch.randn(batch, heads, 2, dim), cos, sin) is None  # prefill: transformers'


@needs_kernel
@needs_layers
def test_a_q4_model_runs_its_norms_and_rotary_on_the_kernels_and_float32_models_keep_their_bits(test_tier_assets):
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    loaded = load_model(test_tier_assets.model.local_path, quantization="q4")
    norms = [m for m in loaded.model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert norms and all("forward" in vars(m) for m in norms)  # every norm: the kernel's forward
    assert getattr(modeling_llama.apply_rotary_pos_emb, "millm_kernel", False)
    # The rotary is installed for the modeling module: a float32 model decodes the same bits as with
    # transformers' own function.
    model = AutoModelForCausalLM.from_pretrained(test_tier_assets.model.local_path, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 9, 30, 41, 7]])
    logits = {}
    for name, function in (("kernel", modeling_llama.apply_rotary_pos_emb),
                           ("transformers", modeling_llama.apply_rotary_pos_emb.original)):
        with torch.inference_mode(), _patched(modeling_llama, function):
            cache = new_cache(model.config)
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            logits[name] = torch.cat([model(input_ids=torch.tensor([[token]]), past_key_values=cache,
                                            use_cache=True).logits for token in (3, 17, 22)])
    assert torch.equal(logits["kernel"], logits["transformers"])


class _patched:
    def __init__(self, module, function):
        self.module, self.function = module, function

    def __enter__(self):
        self.saved, self.module.apply_rotary_pos_emb = self.module.apply_rotary_pos_emb, self.function

    def __exit__(self, *exc):
        self.module.apply_rotary_pos_emb = self.saved


# --- the gated MLP's SiLU·mul --------------------------------------------------------------------

@needs_layers
@pytest.mark.parametrize("width", [16, 1536, 7, 40])
@pytest.mark.parametrize("shape", [(1,), (8,), (3, 5)])
def test_the_silu_mul_kernel_is_silu_of_gate_times_up(width, shape):
    fused = torch.randn(*shape, 2 * width + 3) * 4  # [gate | up | 3 more], as a fused output leaves them
    fused[..., :4] = torch.tensor([0.0, -0.0, 60.0, -60.0])  # zeros, and e^∓60 far from 1
    out = cpu_kernels.silu_mul(fused, 0, width, width)
    gate, up = fused[..., :width].double(), fused[..., width : 2 * width].double()
    expected = gate / (1 + torch.exp(-gate)) * up
    assert out.shape == (*shape, width) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=2e-6, atol=1e-30)
    torch.testing.assert_close(out, torch.nn.functional.silu(fused[..., :width]) * fused[..., width : 2 * width],
                               rtol=1e-6, atol=1e-30)
    swapped = cpu_kernels.silu_mul(fused, width, 0, width)  # any order of the two slices
    torch.testing.assert_close(swapped, torch.nn.functional.silu(fused[..., width : 2 * width]) * fused[..., :width],
                               rtol=1e-6, atol=1e-30)
    assert cpu_kernels.silu_mul(fused, 0, width + 4, width) is None  # up would run past the row
    assert cpu_kernels.silu_mul(fused.double(), 0, width, width) is None


@needs_q4_kernel
@needs_layers
def test_a_q4_models_mlps_run_silu_mul_on_the_kernel_with_the_same_logits_within_rounding(test_tier_assets, monkeypatch):
    loaded = load_model(test_tier_assets.model.local_path, quantization="q4")
    mlps = [m for m in loaded.model.modules() if type(m).__name__ == "LlamaMLP"]
    assert mlps and all("forward" in vars(m) for m in mlps)  # every MLP: the kernel's forward
    calls = []
    kernel = cpu_kernels.silu_mul
    monkeypatch.setattr(cpu_kernels, "silu_mul", lambda *args: calls.append(args[0].shape) or kernel(*args))
    ids = torch.tensor([[5, 9, 30, 41, 7], [3, 3, 17, 22, 8]])
    with torch.inference_mode():
        ours = loaded.model(input_ids=ids).logits
        assert len(calls) == len(mlps)
        for mlp in mlps:  # transformers' own forward: slices, SiLU, product
            del mlp.forward
        reference = loaded.model(input_ids=ids).logits
    assert len(calls) == len(mlps)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
