"""Q4/Q8 on CPU through torch's own kernels: the math, the loader, SAE fidelity and steering."""

from __future__ import annotations

import pytest
import torch

from engine.generation import FinishEvent, GenerationRequest
from engine.loading import estimate_memory_bytes, load_model
from engine.quantization import GROUP_SIZE, FusedSlice, QuantizedLinear, kernel_name, quantize_for_cpu
from engine.runtime import EngineRuntime
from engine.sae import decoder_layers, load_sae
from engine.sampling import SamplingParams
from engine.steering import SteeringFeature, SteeringSpec

TEXTS = [
    "The cat sat on the mat and looked at the dog.",
    "Once upon a time there was a small town by the sea.",
    "The dog ran after the ball in the park.",
    "A bird sang in the tree while the sun rose.",
]


@pytest.mark.parametrize(("quantization", "bound"), [("q4", 0.12), ("q8", 0.01)])
def test_quantized_linear_is_the_dequantized_matmul_and_close_to_dense(quantization, bound):
    torch.manual_seed(0)
    dense = torch.nn.Linear(4 * GROUP_SIZE, 96, bias=True)
    layer = QuantizedLinear(dense, quantization)
    x = torch.randn(2, 5, dense.in_features)
    with torch.inference_mode():
        y = layer(x)
        exact = dense(x)
        through_weight = x @ layer.weight.T + dense.bias
    assert y.shape == exact.shape and y.dtype == torch.float32
    # The forward pass is x ŵᵀ + b up to the activations' rounding (int8 per 32 inputs, or bf16 on torch's kernel) ...
    assert torch.allclose(y, through_weight, atol=0.05 * through_weight.abs().max().item())
    # ... and ŵ is close to w: 4 bits per weight leaves a few % of error, 8 bits well under 1 %.
    relative = ((layer.weight - dense.weight).norm() / dense.weight.norm()).item()
    assert 0 < relative < bound, relative
    assert not any(p.dtype == torch.float32 and p.dim() == 2 for p in layer.parameters())


def test_q8_gives_a_row_the_same_bits_alone_or_in_a_batch_of_eight():
    # Activations are quantized per row (per token): a request's numbers must not depend on what else is batched
    # with it. Rows of very different magnitudes would move a per-tensor scale, so they would show it.
    torch.manual_seed(0)
    layer = QuantizedLinear(torch.nn.Linear(4 * GROUP_SIZE, 96, bias=True), "q8")
    rows = torch.randn(8, layer.in_features) * torch.logspace(-3, 3, 8).unsqueeze(1)
    with torch.inference_mode():
        batch = layer(rows)
        alone = torch.cat([layer(rows[i : i + 1]) for i in range(8)])
    assert torch.equal(batch, alone)
    assert batch.abs().amin(dim=1).gt(0).all()  # no row squashed to zero by another row's scale


def test_q8_model_gives_each_prompt_the_same_logits_alone_or_batched(model_dir):
    loaded = load_model(model_dir, quantization="q8")
    torch.manual_seed(0)
    ids = torch.randint(3, loaded.model.config.vocab_size, (8, 9))
    with torch.inference_mode():
        batch = loaded.model(ids).logits
        alone = torch.cat([loaded.model(ids[i : i + 1]).logits for i in range(8)])
    assert torch.equal(batch, alone)


@pytest.fixture(scope="module")
def model_dir(test_tier_assets):
    return test_tier_assets.model.local_path


@pytest.mark.parametrize("quantization", ["q4", "q8"])
def test_cpu_load_replaces_every_linear_and_the_head(model_dir, quantization):
    loaded = load_model(model_dir, quantization=quantization)
    model = loaded.model
    assert loaded.quantization == quantization and loaded.kernel.startswith(kernel_name(quantization))
    assert quantization.upper() in loaded.variant and "cpu" in loaded.variant
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears, linears  # attention, MLP and LM head all quantized on the test model
    assert isinstance(model.get_output_embeddings(), QuantizedLinear)
    dense = load_model(model_dir)
    assert loaded.memory_bytes < dense.memory_bytes
    assert abs(loaded.estimated_memory_bytes - loaded.memory_bytes) / loaded.memory_bytes < 0.02
    assert loaded.estimated_memory_bytes == estimate_memory_bytes(model.config, "float32", quantization, on_cpu=True)
    ids = loaded.tokenizer("The cat", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4


def _fvu(model, tokenizer, sae, layer: int) -> float:
    """FVU of the SAE on the model's layer-`layer` residuals over TEXTS (first position dropped: a sink)."""
    captured = []
    handle = decoder_layers(model)[layer].register_forward_hook(
        lambda m, i, o: captured.append((o[0] if isinstance(o, tuple) else o)[0, 1:])
    )
    try:
        with torch.inference_mode():
            for text in TEXTS:
                model(tokenizer(text, return_tensors="pt").input_ids)
    finally:
        handle.remove()
    acts = torch.cat(captured).float()
    recon = sae.decode(sae.encode(acts))
    return float((recon - acts).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum())


@pytest.mark.parametrize("quantization", ["q4", "q8"])
def test_the_sae_reads_the_quantized_model_about_as_well(test_tier_assets, model_dir, quantization):
    sae = load_sae(test_tier_assets.sae.local_path)
    layer = test_tier_assets.sae.layer
    dense = load_model(model_dir)
    quantized = load_model(model_dir, quantization=quantization)
    fp32 = _fvu(dense.model, dense.tokenizer, sae, layer)
    fvu = _fvu(quantized.model, quantized.tokenizer, sae, layer)
    assert fvu <= fp32 + 0.02, (fvu, fp32)


def _demo_fvu(loaded, sae, layer: int, sink_norm_cutoff: float) -> float:
    """FVU of the demo SAE on its layer's residuals of text it never saw, sinks cut as its own test does."""
    from tests.engine.test_smollm2_assets import NEW_TEXTS

    model, tokenizer = loaded.model, loaded.tokenizer
    captured = []
    handle = decoder_layers(model)[layer].register_forward_hook(
        lambda m, i, o: captured.append((o[0] if isinstance(o, tuple) else o)[0, 1:])
    )
    try:
        with torch.inference_mode():
            for item in NEW_TEXTS:
                text = item if isinstance(item, str) else tokenizer.apply_chat_template(item, tokenize=False)
                model(torch.tensor([tokenizer(text)["input_ids"]]))
    finally:
        handle.remove()
    acts = torch.cat(captured).float()
    acts = acts[acts.norm(dim=-1) < sink_norm_cutoff]
    recon = sae.decode(sae.encode(acts))
    return float((recon - acts).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum())


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("quantization", ["q4", "q8"])
def test_the_demo_sae_reads_the_quantized_demo_model_about_as_well(quantization):
    # Measured 2026-12-01: fp32 0.1894, Q4 0.1890, Q8 (W8A8) 0.1993 on 198 tokens (docs/benchmarks.md).
    from engine.assets.smollm2 import build_demo_tier, read_manifest
    from tests.engine.test_smollm2_assets import ASSET_CACHE

    assets = build_demo_tier(ASSET_CACHE / "demo", progress=False)
    cutoff = read_manifest(ASSET_CACHE / "demo")["sink_norm_cutoff"]
    sae = load_sae(assets.sae.local_path)
    path = assets.model.local_path
    fp32 = _demo_fvu(load_model(path), sae, assets.sae.layer, cutoff)
    fvu = _demo_fvu(load_model(path, quantization=quantization), sae, assets.sae.layer, cutoff)
    assert fvu <= fp32 + 0.02, (fvu, fp32)


def _greedy(runtime: EngineRuntime, steering=None) -> list[int]:
    request = GenerationRequest("The cat", SamplingParams(max_tokens=8, temperature=0.0), steering=steering)
    return [e.token_id for e in runtime.scheduler.submit(request) if not isinstance(e, FinishEvent)]


@pytest.mark.parametrize("quantization", [None, "q4", "q8"])
def test_steering_changes_the_text_on_the_quantized_model(test_tier_assets, model_dir, quantization):
    runtime = EngineRuntime()
    try:
        runtime.load(name="tiny", path=str(model_dir), quantization=quantization)
        runtime.attach_sae(name="sae", path=str(test_tier_assets.sae.local_path))
        plain = _greedy(runtime)
        steered = _greedy(runtime, runtime.compile(SteeringSpec(features=(SteeringFeature(7, 80.0),))))
        assert len(plain) == 8 and steered != plain
        assert _greedy(runtime) == plain
    finally:
        runtime.unload()


class _Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        width = 2 * GROUP_SIZE
        self.q_proj = torch.nn.Linear(width, width, bias=False)
        self.k_proj = torch.nn.Linear(width, 32, bias=False)
        self.v_proj = torch.nn.Linear(width, 32, bias=False)


@pytest.mark.parametrize("quantization", ["q4", "q8"])
def test_fused_siblings_give_each_its_own_product_whatever_the_call_order(quantization):
    torch.manual_seed(0)
    attention = _Attention()
    alone = {name: QuantizedLinear(getattr(attention, name), quantization) for name in ("q_proj", "k_proj", "v_proj")}
    assert quantize_for_cpu(attention, quantization) == 3
    assert isinstance(attention.k_proj, FusedSlice)
    x, other = torch.randn(3, 2 * GROUP_SIZE), torch.randn(3, 2 * GROUP_SIZE)
    with torch.inference_mode():
        # the model's order, then a different input half-way, then a repeat of one sibling
        calls = [("q_proj", x), ("k_proj", x), ("v_proj", x), ("q_proj", other), ("k_proj", x),
                 ("v_proj", other), ("k_proj", other), ("k_proj", other)]
        for name, tensor in calls:
            assert torch.allclose(getattr(attention, name)(tensor), alone[name](tensor), atol=1e-5), name
    assert torch.allclose(attention.v_proj.weight, alone["v_proj"].weight)


@pytest.mark.parametrize("quantization", ["q4", "q8"])
def test_gpt2_conv1d_layers_are_quantized_too(tmp_path, model_dir, quantization):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=128)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    dense, loaded = load_model(tmp_path), load_model(tmp_path, quantization=quantization)
    left = [type(m).__name__ for m in loaded.model.modules() if type(m).__name__ in ("Conv1D", "Linear")]
    assert not left, left  # c_attn, c_proj, c_fc, mlp.c_proj and the head
    assert abs(loaded.estimated_memory_bytes - loaded.memory_bytes) / loaded.memory_bytes < 0.02
    ids = tokenizer("The cat sat on the mat", return_tensors="pt").input_ids
    with torch.inference_mode():
        exact, approx = dense.model(ids).logits, loaded.model(ids).logits
    assert ((approx - exact).norm() / exact.norm()).item() < 0.15
