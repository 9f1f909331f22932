"""Decode slowdown of the SAE hook, measured side by side in one run.

    .venv/bin/python bench/hook_overhead.py                       # tiny Llama, CPU
    .venv/bin/python bench/hook_overhead.py --size gpt2 --tokens 48
    .venv/bin/python bench/hook_overhead.py --size gpt2 --device cuda --dtype bfloat16 --batch 8

A random Llama (tiny: hidden 32, 3 layers; gpt2: GPT-2-small-sized, hidden 768, 12 layers) decodes
greedily with a KV cache through the same per-step path the scheduler uses (set_context before
each forward, collect after). Modes, interleaved round by round so machine load hits all alike:
  baseline       no hook attached
  steer          hook attached, every row steered additively on 8 features
  steer+clamp    even rows clamp 8 features (encoding 8 columns), odd rows additive
  steer+monitor  additive steering and monitoring of every row (full encode, top-k, statistics)
Reported per mode: the best decode rate over the rounds (the least disturbed by other load), its
step time against the baseline's, and the hook's own cost per step timed in isolation on a
(batch, 1, hidden) residual, which is what to trust on a busy machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.interceptors import ForwardContext, RowInfo  # noqa: E402
from engine.sae import SaeWeights  # noqa: E402
from engine.sae_hook import SaeHook  # noqa: E402
from engine.steering import SteeringFeature, SteeringSpec  # noqa: E402

SIZES = {
    "tiny": {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 64, "vocab_size": 128},
    "gpt2": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 12,
             "intermediate_size": 3072, "vocab_size": 50257},
}  # fmt: skip
MODES = ("baseline", "steer", "steer+clamp", "steer+monitor")
STEERED_FEATURES = 8


def random_sae(d_in: int, d_sae: int, layer: int) -> SaeWeights:
    return SaeWeights(
        architecture="standard",
        hook_name=f"blocks.{layer}.hook_resid_post",
        hook_layer=layer,
        W_enc=torch.randn(d_in, d_sae) / d_in**0.5,
        b_enc=torch.zeros(d_sae),
        W_dec=torch.randn(d_sae, d_in) / d_in**0.5,
        b_dec=torch.zeros(d_in),
    )


def decode_tokens_per_second(
    model: LlamaForCausalLM,
    hook: SaeHook,
    rows: tuple[RowInfo, ...] | None,
    prompt: torch.Tensor,
    tokens: int,
) -> float:
    batch = prompt.shape[0]
    device = prompt.device

    def forward(input_ids: torch.Tensor, cache: DynamicCache, generated: bool) -> torch.Tensor:
        if rows is not None:
            valid = torch.ones(input_ids.shape, dtype=torch.bool, device=device)
            hook.set_context(
                ForwardContext(rows=rows, generated_mask=valid if generated else ~valid, valid_mask=valid)
            )
        logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits
        if rows is not None:
            hook.collect()
        return logits[:, -1].argmax(dim=-1, keepdim=True)

    with torch.inference_mode():
        cache = DynamicCache()
        next_token = forward(prompt, cache, generated=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(tokens):
            next_token = forward(next_token, cache, generated=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return batch * tokens / elapsed


def isolated_hook_seconds(
    hook: SaeHook, rows: tuple[RowInfo, ...], batch: int, hidden: int, dtype, device
) -> float:
    """Seconds per call of the hook on one decode step's residual, context and collect included."""
    residual = torch.randn(batch, 1, hidden, dtype=dtype, device=device)
    mask = torch.ones(batch, 1, dtype=torch.bool, device=device)
    step_context = ForwardContext(rows=rows, generated_mask=mask, valid_mask=mask)
    layer = torch.nn.Identity()
    calls = 200

    def one_step() -> None:
        hook.set_context(step_context)
        hook._on_layer_output(layer, (), residual)
        hook.collect()

    with torch.inference_mode():
        for _ in range(20):
            one_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            one_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--d-sae", type=int, default=None, help="default: 16 × hidden size")
    parser.add_argument("--tokens", type=int, default=64, help="decode steps per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = parser.parse_args()

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(**SIZES[args.size])
    model = LlamaForCausalLM(config).to(device=args.device, dtype=dtype).eval()
    layer = config.num_hidden_layers // 2
    d_sae = args.d_sae or 16 * config.hidden_size
    sae = random_sae(config.hidden_size, d_sae, layer)
    prompt = torch.randint(3, config.vocab_size, (args.batch, 16), device=args.device)

    hook = SaeHook()
    features = [SteeringFeature(i * 97 % d_sae, 2.0) for i in range(STEERED_FEATURES)]
    results: dict[str, list[float]] = {mode: [] for mode in MODES}
    hook_seconds: dict[str, float] = {}
    for round_index in range(args.rounds):
        for mode in MODES:
            if mode == "baseline":
                hook.detach()
                rows = None
            else:
                hook.attach(model, sae)
                additive = hook.compile(SteeringSpec(features))
                clamp = hook.compile(SteeringSpec(features, mode="clamp"))
                rows = tuple(
                    RowInfo(
                        request_id=f"r{i}",
                        steering=clamp if mode == "steer+clamp" and i % 2 == 0 else additive,
                        monitor=mode == "steer+monitor",
                    )
                    for i in range(args.batch)
                )
            results[mode].append(decode_tokens_per_second(model, hook, rows, prompt, args.tokens))
            if rows is not None and round_index == 0:
                hook_seconds[mode] = isolated_hook_seconds(
                    hook, rows, args.batch, config.hidden_size, dtype, prompt.device
                )
    hook.detach()

    baseline = max(results["baseline"])
    print(
        f"{args.size} Llama ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {args.dtype}, "
        f"{args.device}), SAE d_sae={d_sae} on layer {layer}, batch {args.batch}, "
        f"{args.tokens} decode steps × {args.rounds} rounds (best round):"
    )
    baseline_step = args.batch / baseline
    for mode in MODES:
        rate = max(results[mode])
        line = f"  {mode:<14} {rate:9.1f} tok/s   {baseline / rate:5.3f}× the baseline step time"
        if mode in hook_seconds:
            cost = hook_seconds[mode]
            line += f"   hook alone {cost * 1e6:8.1f} µs/step = {100 * cost / baseline_step:5.2f} % of a baseline step"
        print(line)


if __name__ == "__main__":
    main()
