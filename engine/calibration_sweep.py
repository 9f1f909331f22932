"""The generation sweep that refines a concept feature's strength: steer it at a few strengths on a few
calibration prompts (greedy, all rows in one batch through the scheduler), and keep the strength whose
answers mention the feature's concept most while every answer stays fluent.

Calibration prompts are not the bench's neutral prompts (engine/assets/steering_quality.py), so the
bench measures strengths it did not choose them on.

Choice per feature (`choose_strength`), over the swept strengths s_1 < … < s_S in any one unit:
    fluent(s)  = every answer at s is fluent (distinct-token ratio ≥ 0.5, no run > 8)
    score(s)   = number of answers at s that mention a concept word
    s*         = the fluent s with the largest score; ties → the larger s (the bench's prompts are
                 different, so the margin goes to the concept); no hit at any fluent s → the largest
                 fluent s; nothing fluent → the smallest s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine import calibration
from engine.assets import steering_quality as quality
from engine.chat import build_chat_prompt
from engine.generation import FinishEvent, GenerationRequest
from engine.sampling import SamplingParams
from engine.steering import CompiledSteering

CALIBRATION_PROMPTS = (
    "Describe a place you like.",
    "What should I do this evening?",
    "Tell me something interesting.",
)


@dataclass(frozen=True)
class SweepPoint:
    strength: float
    hits: int  # answers mentioning a concept word
    fluent: int  # fluent answers
    answers: int


def choose_strength(points: Sequence[SweepPoint]) -> float:
    """s* of the module docstring."""
    ordered = sorted(points, key=lambda p: p.strength)
    fluent = [p for p in ordered if p.fluent == p.answers]
    if not fluent:
        return ordered[0].strength
    best = max(p.hits for p in fluent)
    return [p for p in fluent if p.hits == best][-1].strength


class SteeringRunner:
    """Greedy answers for many (prompt, steering) rows at once through a running GenerationScheduler."""

    def __init__(self, scheduler: Any, tokenizer: Any) -> None:
        self.scheduler, self.tokenizer = scheduler, tokenizer

    def run(self, rows: Sequence[tuple[str, CompiledSteering | None]], tokens: int) -> list[list[int]]:
        params = SamplingParams(max_tokens=tokens, temperature=0.0)
        handles = []
        for prompt, steering in rows:
            ids = build_chat_prompt(self.tokenizer, [{"role": "user", "content": prompt}]).token_ids
            handles.append(self.scheduler.submit(GenerationRequest(list(ids), params, steering=steering)))
        out = []
        for handle in handles:
            ids = []
            for event in handle:
                if isinstance(event, FinishEvent):
                    if event.finish_reason == "error":
                        raise RuntimeError(event.error)
                    break
                if event.token_id != self.tokenizer.eos_token_id:
                    ids.append(event.token_id)
            out.append(ids)
        return out


def generation_sweep(runner: SteeringRunner, compile_at: Callable[[int, float], CompiledSteering],
                     features: Sequence[tuple[int, Sequence[str]]], strengths: Sequence[float], *,
                     prompts: Sequence[str] = CALIBRATION_PROMPTS, tokens: int = 32, chunk: int = 96,
                     on_progress: Callable[[int, int], None] | None = None) -> dict[int, list[SweepPoint]]:
    """Sweep points per feature: `compile_at(index, strength)` builds the steering of one row; rows go
    to the scheduler `chunk` at a time (it batches them), so progress can be reported between chunks."""
    rows = [(index, strength, prompt) for index, _ in features for strength in strengths for prompt in prompts]
    compiled: dict[tuple[int, float], CompiledSteering] = {}
    outputs: list[list[int]] = []
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        batch = []
        for index, strength, prompt in part:
            key = (index, strength)
            if key not in compiled:
                compiled[key] = compile_at(index, strength)
            batch.append((prompt, compiled[key]))
        outputs += runner.run(batch, tokens)
        if on_progress is not None:
            on_progress(min(start + chunk, len(rows)), len(rows))
    words = dict(features)
    points: dict[int, list[SweepPoint]] = {}
    per_point = len(prompts)
    for offset in range(0, len(rows), per_point):
        index, strength, _ = rows[offset]
        answers = outputs[offset:offset + per_point]
        texts = [runner.tokenizer.decode(ids, skip_special_tokens=True) for ids in answers]
        points.setdefault(index, []).append(SweepPoint(
            strength=strength, hits=sum(quality.mentions(t, words[index]) for t in texts),
            fluent=sum(quality.is_fluent(ids) for ids in answers), answers=per_point))
    return points


def embedding_coherence(model: torch.nn.Module, tokenizer: Any, words: Sequence[str]) -> float:
    """Mean pairwise cosine of the words' token embeddings: high when they name one concept."""
    table = model.get_input_embeddings().weight.detach()
    ids = [tokenizer(" " + word, add_special_tokens=False)["input_ids"][0] for word in words]
    vectors = torch.nn.functional.normalize(table[ids].float(), dim=-1)
    n = len(ids)
    return float(((vectors @ vectors.T).sum() - n) / (n * (n - 1))) if n > 1 else 0.0


# --- the whole calibration of one SAE ---------------------------------------------------------------

# × the hooked layer's residual norm: where KL_i(s) is measured. The default spans what steering one layer
# needs (the test tier's decoder rows reach 1 nat near 2.5×); a recipe that spreads over many layers needs
# far less (the demo: 0.04–0.16, see engine/assets/smollm2.py), so its caller passes a narrower grid.
KL_GRID = (0.05, 0.25, 1.25)
SWEEP_STRENGTHS = (0.08, 0.10, 0.12, 0.14)  # × residual norm, the concept features' generation sweep
# When the recipe stops steering (until_concept / max_steered_tokens) stronger settings stay fluent: swept on the demo
# SAE's 48 features, 33 chose 0.16 (docs/benchmarks.md, "Until the concept is written, as an engine option").
SWEEP_STRENGTHS_STOPPED = (0.10, 0.12, 0.14, 0.16)


def calibrate_sae(*, loaded: Any, sae: Any, recipe: calibration.CalibrationRecipe, residual_norm: float | None,
                  concept_directions: torch.Tensor | None = None, sweep_features: Sequence[tuple[int, Sequence[str]]] = (),
                  concept_tokens: torch.Tensor | None = None,
                  sweep_strengths: Sequence[float] | None = None, sweep_tokens: int = 28,
                  target_kl: float = calibration.DEFAULT_TARGET_KL, batch_size: int = 48,
                  kl_grid: Sequence[float] = KL_GRID, refine: bool = True,
                  progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Recommended raw strength and range per feature of `sae` (SaeWeights) on `loaded` (engine LoadedModel), for
    `recipe`; the calibration.json fields (`write_calibration`). `sweep_features` (index, concept words) are
    refined by the generation sweep, and set the KL target for all others (module docstrings). A recipe that stops
    steering (max_steered_tokens, until_concept: `concept_tokens`, else logit-lens tokens) is swept with it; the
    KL method reads the first steered token, which either option leaves as it is."""
    from engine.sae_hook import SaeHook
    from engine.scheduler import GenerationScheduler
    from engine.steering import SteeringFeature, SteeringSpec, compile_steering
    from engine.steering_layers import NORM_PROBE_TEXT, LayerSteeringHook, residual_norms

    if sweep_strengths is None:
        stops = recipe.until_concept or recipe.max_steered_tokens is not None
        sweep_strengths = SWEEP_STRENGTHS_STOPPED if stops else SWEEP_STRENGTHS
    model, tokenizer = loaded.model, loaded.tokenizer
    norms = residual_norms(model, tokenizer(NORM_PROBE_TEXT)["input_ids"])
    hook_norm = norms[sae.hook_layer]
    residual_norm = residual_norm or hook_norm  # the SAE's recorded median norm, else the one measured here
    if recipe.direction == "concept":
        if concept_directions is None:
            raise ValueError("a concept-direction recipe needs the SAE's concept directions")
        directions = concept_directions.float()
    else:
        directions = sae.W_dec.detach().float().cpu()
    row_norms = directions.norm(dim=-1)
    unit = torch.nn.functional.normalize(directions, dim=-1)
    layers = recipe.layers or (sae.hook_layer,)
    scales = {layer: norms[layer] / hook_norm for layer in layers}
    grid = [g * residual_norm for g in kl_grid]
    prompts = [_prompt_ids(tokenizer, text) for text in calibration.KL_PROMPTS]
    kl = calibration.next_token_kl(model, prompts, unit, grid, layer_scales=scales,
                                   on_progress=(lambda d, n: progress("kl", d, n)) if progress else None)
    grid_rows = calibration.strength_grid(grid, kl.shape[0])

    refined: dict[int, float] = {}
    points: dict[int, list[SweepPoint]] = {}
    if sweep_features:
        hook, layer_hook = SaeHook(), LayerSteeringHook()
        scheduler = GenerationScheduler(loaded, max_batch_size=batch_size, interceptors=[hook, layer_hook]).start()
        try:
            attached = scheduler.call(lambda: hook.attach(model, sae)).result()
            scheduler.call(lambda: layer_hook.attach(model)).result()

            def compile_at(index: int, strength: float) -> CompiledSteering:
                spec = SteeringSpec(features=(SteeringFeature(index, strength * residual_norm),), mode=recipe.mode,
                                    positions=recipe.positions, layers=recipe.layers, direction=recipe.direction,
                                    max_steered_tokens=recipe.max_steered_tokens, until_concept=recipe.until_concept)
                return compile_steering(attached, spec, layer_norms=norms, concept_directions=concept_directions,
                                        concept_tokens=concept_tokens,
                                        unembedding=model.get_input_embeddings().weight.detach()
                                        if recipe.until_concept and concept_tokens is None else None)

            points = generation_sweep(SteeringRunner(scheduler, tokenizer), compile_at, sweep_features,
                                      sweep_strengths, tokens=sweep_tokens,
                                      on_progress=(lambda d, n: progress("sweep", d, n)) if progress else None)
        finally:
            scheduler.stop()
            hook.detach()
            layer_hook.detach()
        # Chosen as coefficients in residual-norm units; KL was measured along unit-norm directions, so in
        # the norm of the added vector: coefficient × residual norm × |direction row|.
        refined = {index: choose_strength(p) * residual_norm * float(row_norms[index]) for index, p in points.items()}
        chosen = torch.tensor(list(refined.values()))
        at = calibration.kl_at_strength(kl[list(refined)], grid, chosen)
        target_kl = float(at.median())
    if refine:
        # One more pass at each feature's first estimate: log KL is convex in log s, so interpolating between
        # points far apart overshoots; with a point at the estimate the error is that of a narrow segment.
        first = calibration.strength_at_kl(kl, grid, target_kl)
        live = ~first.isnan()
        estimate = torch.where(live, first, torch.tensor(grid[-1], dtype=first.dtype))
        measured = calibration.next_token_kl(
            model, prompts, unit, estimate.unsqueeze(1), layer_scales=scales,
            on_progress=(lambda d, n: progress("kl refine", d, n)) if progress else None)
        grid_rows, kl = calibration.with_points(grid_rows, kl, estimate, measured.squeeze(1))
    strengths = calibration.calibrate_from_kl(kl, grid_rows, target=target_kl, refined=refined)
    # Back from "norm of the added vector" to the coefficient of the SAE's own direction row.
    for key in ("recommended", "low", "high"):
        strengths[key] = [None if v is None or float(row_norms[i]) == 0 else round(v / float(row_norms[i]), 4)
                          for i, v in enumerate(strengths[key])]
    method = {"kl_prompts": list(calibration.KL_PROMPTS), "kl_grid_residual_norm": list(kl_grid),
              "target_kl": round(target_kl, 4), "range_factor": calibration.RANGE_FACTOR,
              "sweep": {"prompts": list(CALIBRATION_PROMPTS), "strengths_residual_norm": list(sweep_strengths),
                        "tokens": sweep_tokens, "features": len(points),
                        "points": {str(i): [[p.strength, p.hits, p.fluent, p.answers] for p in ps]
                                   for i, ps in points.items()}}}
    return {"strengths": strengths, "method": method, "residual_norm": residual_norm}


def _prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """A chat prompt ending where the answer starts (generated-only steering acts from there), or the text."""
    if getattr(tokenizer, "chat_template", None):
        return list(build_chat_prompt(tokenizer, [{"role": "user", "content": text}]).token_ids)
    return list(tokenizer(text)["input_ids"])
