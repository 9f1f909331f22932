"""Decode slowdown of steering: the same model with no SAE vs the SAE attached and 8 features steered, and
vs two SAEs attached with 8 features each, 4 of them conditional (on the other SAE's features: one SAE's
conditions read the same pass, the other's the previous token).

    .venv/bin/python bench/steering.py                 # test tier (tiny Llama)
    .venv/bin/python bench/steering.py --tier demo     # SmolLM2-135M + its trained SAE

Runs the inference engine in-process (the scheduler and SAE hook the inference process runs),
interleaving rounds of each mode so machine load hits both alike, and prints the median decode
tok/s of each mode and their ratio (goals: one SAE steered/plain <= 1.05, two SAEs <= 1.10). A tier with
one SAE (the demo tier today) attaches it twice, on the same layer.
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
from engine.steering_conditions import ConditionalFeature, FeatureCondition, SteeringConditions  # noqa: E402

PROMPT = "Once upon a time, in a city by the sea,"


def build(tier: str, asset_dir: Path):
    if tier == "test":
        from engine.assets.tiny import build_test_tier

        return build_test_tier(asset_dir / "test")
    from engine.assets.smollm2 import build_demo_tier

    return build_demo_tier(asset_dir / "demo")


def decode_rate(runtime: EngineRuntime, tokens: int, steering, conditions=None) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    handle = runtime.scheduler.submit(GenerationRequest(PROMPT, params, steering=steering, conditions=conditions))
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
    second = assets.extra_saes[0] if assets.extra_saes else assets.sae
    plain_rates, steered_rates, two_rates = [], [], []
    decode_rate(runtime, 8, None)  # warm-up
    for _ in range(args.rounds):
        runtime.detach_sae()
        plain_rates.append(decode_rate(runtime, tokens, None))
        runtime.attach_sae(name="bench-sae", path=str(assets.sae.local_path))
        features = tuple(SteeringFeature(i * 7, 1.0) for i in range(args.features))
        compiled = runtime.compile(SteeringSpec(features=features, mode="additive"))
        steered_rates.append(decode_rate(runtime, tokens, compiled))
        runtime.attach_sae(name="bench-sae-2", path=str(second.local_path))
        two_rates.append(decode_rate(runtime, tokens, *two_sae_steering(runtime, args.features)))
    runtime.unload()
    plain, steered = statistics.median(plain_rates), statistics.median(steered_rates)
    two = statistics.median(two_rates)
    print(f"model {assets.model.repo_id}, SAE d_sae {assets.sae.d_sae} at layer {assets.sae.layer}, "
          f"{tokens} tokens, {args.rounds} interleaved rounds, torch threads {torch.get_num_threads()}")
    print(f"no SAE                      {plain:8.1f} tok/s")
    print(f"SAE + {args.features} features steered    {steered:8.1f} tok/s")
    print(f"slowdown (plain / steered)  {plain / steered:8.3f}   (goal <= 1.05)")
    print(f"2 SAEs (layers {assets.sae.layer}, {second.layer}), {args.features} features each, half conditional "
          f"{two:8.1f} tok/s")
    print(f"slowdown (plain / 2 SAEs)   {plain / two:8.3f}   (goal <= 1.10)")


def two_sae_steering(runtime: EngineRuntime, per_sae: int):
    """Per SAE: per_sae features, half of them plain and half conditional on a feature of the other SAE."""
    names = list(runtime.attached)
    plain, conditional = [], []
    for n, name in enumerate(names):
        other = names[1 - n]
        for i in range(per_sae):
            if i < per_sae // 2:
                plain.append(SteeringFeature(i * 7 + n, 1.0, sae=name))
            else:
                conditional.append(ConditionalFeature(i * 7 + n, 1.0, FeatureCondition(i * 5, above=0.5, sae=other),
                                                      sae=name))
    return (runtime.compile(SteeringSpec(features=tuple(plain))),
            runtime.compile_conditions(SteeringConditions(features=tuple(conditional))))


if __name__ == "__main__":
    main()
