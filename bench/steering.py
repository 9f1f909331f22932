"""Decode slowdown of steering: the same model with no SAE vs the SAE attached and 8 features steered.

    .venv/bin/python bench/steering.py                 # test tier (tiny Llama)
    .venv/bin/python bench/steering.py --tier demo     # SmolLM2-135M + its trained SAE

Runs the inference engine in-process (the scheduler and SAE hook the inference process runs),
interleaving rounds of each mode so machine load hits both alike, and prints the median decode
tok/s of each mode and their ratio (goal: steered/plain slowdown <= 1.05).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.generation import FinishEvent, GenerationRequest  # noqa: E402
from engine.runtime import EngineRuntime  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from engine.steering import SteeringFeature, SteeringSpec  # noqa: E402

PROMPT = "Once upon a time, in a city by the sea,"


def build(tier: str, asset_dir: Path):
    if tier == "test":
        from engine.assets.tiny import build_test_tier

        return build_test_tier(asset_dir / "test")
    from engine.assets.smollm2 import build_demo_tier

    return build_demo_tier(asset_dir / "demo")


def decode_rate(runtime: EngineRuntime, tokens: int, steering) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    handle = runtime.scheduler.submit(GenerationRequest(PROMPT, params, steering=steering))
    first = last = None
    for event in handle:
        now = time.perf_counter()
        if isinstance(event, FinishEvent):
            break
        first = first or now
        last = now
    return (tokens - 1) / (last - first)  # decode only: from the first token to the last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", choices=["test", "demo"], default="test")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--asset-dir", type=Path, default=ROOT / "var" / "assets")
    args = parser.parse_args()
    tokens = args.tokens or (200 if args.tier == "test" else 48)
    assets = build(args.tier, args.asset_dir)
    runtime = EngineRuntime()
    runtime.load(name="bench", path=str(assets.model.local_path))
    plain_rates, steered_rates = [], []
    decode_rate(runtime, 8, None)  # warm-up
    for _ in range(args.rounds):
        runtime.detach_sae()
        plain_rates.append(decode_rate(runtime, tokens, None))
        runtime.attach_sae(name="bench-sae", path=str(assets.sae.local_path))
        features = tuple(SteeringFeature(i * 7, 1.0) for i in range(args.features))
        compiled = runtime.compile(SteeringSpec(features=features, mode="additive"))
        steered_rates.append(decode_rate(runtime, tokens, compiled))
    runtime.unload()
    plain, steered = statistics.median(plain_rates), statistics.median(steered_rates)
    print(f"model {assets.model.repo_id}, SAE d_sae {assets.sae.d_sae} at layer {assets.sae.layer}, "
          f"{tokens} tokens, {args.rounds} interleaved rounds, torch threads {torch.get_num_threads()}")
    print(f"no SAE                      {plain:8.1f} tok/s")
    print(f"SAE + {args.features} features steered    {steered:8.1f} tok/s")
    print(f"slowdown (plain / steered)  {plain / steered:8.3f}   (goal <= 1.05)")


if __name__ == "__main__":
    main()
