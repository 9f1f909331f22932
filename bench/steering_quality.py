"""Does steering a labelled feature make the model talk about it? Concept hit rate and fluency on the demo tier.

    .venv/bin/python bench/steering_quality.py                       # 40 features x 5 prompts, each at its own
                                                                        # recommended strength (calibration.json)
    .venv/bin/python bench/steering_quality.py --uniform                # the SAE's one strength for every feature
    .venv/bin/python bench/steering_quality.py --today                  # as before calibration, for comparison
    .venv/bin/python bench/steering_quality.py --features 20 --strength 0.1 --layers hook   # explore
    .venv/bin/python bench/steering_quality.py --uniform --until-concept on --max-steered-tokens 15
                                                                        # until the concept is written, <= 15 tokens

For the `--features` most interpretable labelled features (labels naming ≥ 2 concept words that the
unsteered answers do not contain; engine/assets/steering_quality.py), each feature is steered on the
5 neutral prompts (greedy, 40 tokens) through the inference engine (EngineRuntime: scheduler, SAE
hook, steering), all rows batched together. Prints:
- concept hit rate: share of features whose concept words appear in ≥ 2 of their 5 answers;
- fluency: share of answers with distinct-token ratio ≥ 0.5 and no token repeated > 8 times in a row.
Goal (issue 11): hit rate ≥ 60 %, fluency ≥ 90 %.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.assets import steering_quality as quality  # noqa: E402
from engine.calibration_file import read_calibration  # noqa: E402
from engine.calibration_sweep import SteeringRunner  # noqa: E402
from engine.loading import load_model  # noqa: E402
from engine.sae import load_sae  # noqa: E402
from engine.sae_hook import SaeHook  # noqa: E402
from engine.scheduler import GenerationScheduler  # noqa: E402
from engine.steering import SteeringFeature, SteeringSpec, compile_steering  # noqa: E402
from engine.steering_layers import NORM_PROBE_TEXT, LayerSteeringHook, residual_norms  # noqa: E402

# Before calibration nothing recommended a strength; the demo test steered at ≈ 0.35 × the residual norm.
TODAY = {"mode": "additive", "direction": "decoder", "positions": "all", "layers": [],
         "recommended_strength": 0.35}


class Engine:
    """The inference process's engine parts, in-process: scheduler, SAE hook, layer-spread hook."""

    def __init__(self, model_path: str, sae_path: str, *, batch: int, quantization: str | None = None) -> None:
        self.loaded = load_model(model_path, quantization=quantization)
        self.hook, self.layer_hook = SaeHook(), LayerSteeringHook()
        self.scheduler = GenerationScheduler(self.loaded, max_batch_size=batch,
                                             interceptors=[self.hook, self.layer_hook]).start()
        sae = load_sae(sae_path)
        concept = Path(sae_path) / "concept_directions.safetensors"
        concept_file = load_file(concept) if concept.is_file() else {}
        self.concept_directions = concept_file.get("concept_directions")
        self.concept_tokens = concept_file.get("token_ids")  # until_concept's stop tokens
        model = self.loaded.model
        self.sae = self.scheduler.call(lambda: self.hook.attach(model, sae)).result()
        self.scheduler.call(lambda: self.layer_hook.attach(model)).result()
        probe = self.loaded.tokenizer(NORM_PROBE_TEXT)["input_ids"]
        self.layer_norms = self.scheduler.call(lambda: residual_norms(model, probe)).result()

    def embedding_coherence(self, words: list[str]) -> float:
        """Mean pairwise cosine of the words' token embeddings: high when they name one concept."""
        table = self.loaded.model.get_input_embeddings().weight.detach()
        ids = [self.loaded.tokenizer(" " + word, add_special_tokens=False)["input_ids"][0] for word in words]
        vectors = torch.nn.functional.normalize(table[ids].float(), dim=-1)
        n = len(ids)
        return float(((vectors @ vectors.T).sum() - n) / (n * (n - 1))) if n > 1 else 0.0

    def compile(self, spec: SteeringSpec):
        return compile_steering(self.sae, spec, layer_norms=self.layer_norms,
                                concept_directions=self.concept_directions, concept_tokens=self.concept_tokens)

    def run(self, rows: list[tuple[str, SteeringSpec | None]], tokens: int) -> list[tuple[str, list[int]]]:
        """Greedy answers to every (prompt, steering) row, submitted at once (the scheduler batches them)."""
        tokenizer = self.loaded.tokenizer
        steered = [(prompt, self.compile(spec) if spec is not None else None) for prompt, spec in rows]
        answers = SteeringRunner(self.scheduler, tokenizer).run(steered, tokens)
        return [(tokenizer.decode(ids, skip_special_tokens=True), ids) for ids in answers]

    def close(self) -> None:
        self.scheduler.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--today", action="store_true",
                        help="steer as before calibration: decoder row at the SAE's layer, 0.35 x residual norm, "
                             "all positions")
    parser.add_argument("--strength", type=float, default=None, help="override, in residual_norm units")
    parser.add_argument("--positions", choices=["all", "generated_only"], default=None)
    parser.add_argument("--direction", choices=["decoder", "concept"], default=None)
    parser.add_argument("--layers", default=None,
                        help="'hook' (the SAE's layer only) or a comma list of layers to spread the strength over")
    parser.add_argument("--max-steered-tokens", type=int, default=None,
                        help="steer only the first N generated tokens (SteeringSpec.max_steered_tokens); 0: the whole answer")
    parser.add_argument("--until-concept", choices=["on", "off"], default=None,
                        help="stop a row's steering once it writes one of the feature's concept tokens")
    parser.add_argument("--uniform", action="store_true",
                        help="every feature at the SAE's one recommended strength (steering.json), not its own")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="another calibration file than the SAE's calibration.json (an experiment's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantization", choices=["q4", "q8"], default=None, help="the served variant (default fp32)")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--show", type=int, default=2, help="print this many answers per feature")
    parser.add_argument("--json", type=Path, default=None, help="also write every answer here")
    parser.add_argument("--asset-dir", type=Path, default=ROOT / "var" / "assets")
    args = parser.parse_args()

    from engine.assets.smollm2 import build_demo_tier, read_manifest

    started = time.monotonic()
    assets = build_demo_tier(args.asset_dir / "demo")
    manifest = read_manifest(args.asset_dir / "demo")
    torch.set_num_threads(args.threads)
    engine = Engine(str(assets.model.local_path), str(assets.sae.local_path), batch=args.batch, quantization=args.quantization)
    residual_norm = manifest["residual_median_norm"]

    prompts = quality.NEUTRAL_PROMPTS
    baseline = engine.run([(p, None) for p in prompts], args.tokens)
    picked = quality.concept_features(((fl.index, fl.label) for fl in assets.sae.labels), count=args.features,
                                      exclude_words=[text for text, _ in baseline],
                                      coherence=engine.embedding_coherence)
    print(f"{len(picked)} concept features; unsteered fluent {sum(quality.is_fluent(i) for _, i in baseline)}/5")

    recipe = dict(TODAY) if args.today else json.loads((assets.sae.local_path / "steering.json").read_text())
    for key in ("strength", "positions", "direction", "layers"):
        value = getattr(args, key)
        if value is not None:
            recipe["recommended_strength" if key == "strength" else key] = value
    if args.max_steered_tokens is not None:
        recipe["max_steered_tokens"] = args.max_steered_tokens or None
    if args.until_concept is not None:
        recipe["until_concept"] = args.until_concept == "on"
    if recipe["layers"] == "hook":
        recipe["layers"] = []
    elif isinstance(recipe["layers"], str):
        recipe["layers"] = [int(x) for x in recipe["layers"].split(",")]
    print("steering:", {k: v for k, v in recipe.items() if k != "version"})

    # Per-feature recommended strengths (the SAE's calibration.json), unless a uniform strength is asked for.
    calibration = None
    if not args.today and args.strength is None and not args.uniform:
        calibration = (json.loads(args.calibration.read_text()) if args.calibration
                       else read_calibration(assets.sae.local_path))
    if calibration is not None:
        sources = [calibration["source"][index] for index, _ in picked]
        print(f"per-feature strengths from calibration ({sources.count('sweep')} swept, {sources.count('kl')} by KL): "
              + ", ".join(f"#{index} {calibration['recommended'][index] / residual_norm:.3f}" for index, _ in picked))

    def spec_for(index: int) -> SteeringSpec:
        strength = recipe["recommended_strength"] * residual_norm  # residual_norm units -> raw
        if calibration is not None and calibration["recommended"][index] is not None:
            strength = calibration["recommended"][index]  # already raw
        return SteeringSpec(features=(SteeringFeature(index, float(strength)),), mode=recipe["mode"],
                            positions=recipe["positions"], layers=tuple(recipe["layers"]),
                            direction=recipe["direction"], max_steered_tokens=recipe.get("max_steered_tokens"),
                            until_concept=bool(recipe.get("until_concept", False)))

    rows = [(p, spec_for(index)) for index, _ in picked for p in prompts]
    gen_started = time.monotonic()
    outputs = engine.run(rows, args.tokens)
    gen_s = time.monotonic() - gen_started
    answers: dict[int, list[str]] = {}
    fluent = 0
    for (index, _), start in zip(picked, range(0, len(rows), len(prompts)), strict=True):
        chunk = outputs[start:start + len(prompts)]
        answers[index] = [text for text, _ in chunk]
        fluent += sum(quality.is_fluent(ids) for _, ids in chunk)
    words = dict(picked)
    rate = quality.hit_rate(answers, words)
    fluency = fluent / max(1, len(rows))
    for index, texts in answers.items():
        hits = sum(quality.mentions(t, words[index]) for t in texts)
        print(f"#{index} {words[index]} hits {hits}/5")
        for text in texts[:args.show]:
            print("    ", " ".join(text.split())[:110])
    print(f"concept hit rate {rate * 100:.1f}% ({round(rate * len(answers))}/{len(answers)} features), "
          f"fluency {fluency * 100:.1f}% ({fluent}/{len(rows)} answers); "
          f"{len(rows)} answers in {gen_s:.0f}s, total {time.monotonic() - started:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({"hit_rate": rate, "fluency": fluency, "answers": answers,
                                         "words": words, "args": {k: str(v) for k, v in vars(args).items()}},
                                        indent=1))
    engine.close()


if __name__ == "__main__":
    main()
