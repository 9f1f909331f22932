"""Steering sweeps: the same features at several strengths over a few prompts, scored, with a recommended point.

For each strength s, every listed feature runs at s × its own `strength` (default 1) in the request's units,
so one feature without a strength is swept at exactly the listed values; s = 0 is the unsteered baseline,
always included. Per strength, over the prompts (greedy, `max_tokens`):
- concept score: the listed features' mean activation when the steered output is re-encoded by the
  unsteered model + SAE (mean over the output's tokens, then over features and prompts);
- token hits: the share of outputs in which one of the features' top logit-lens tokens (engine/feature_lens.py)
  or a token quoted in its label appears as a word;
- fluency: the mean log-probability of the steered output under the unsteered model (mean over tokens,
  then prompts; engine/token_diff.py);
- degenerate: outputs whose distinct-token ratio is < 0.5 or that repeat one token more than 8 times in a row.
The recommended point is the strength with the highest concept score whose fluency is within FLUENCY_MARGIN
nats of the unsteered outputs' and none of whose outputs is degenerate (None when no steered strength keeps both
while raising the concept score above the unsteered outputs'). Degenerate answers are excluded outright because
the unsteered model finds repetition easy to predict: on the demo tier "My French friends France France …"
scored -1.56 against the unsteered answers' -0.92.

`strengths: "auto"` is a geometric grid AUTO_FACTORS × a centre: the swept features' own calibrated recommended
strength (calibration.json of each feature's SAE; the mean when several have one), else the SAE's recommended
strength when its units are the request's, else AUTO_CENTER[units].

A feature may name any attached SAE (`sae`, as everywhere; steering/sae_addressing.py): it is steered, its
logit lens read and its concept score measured with its own SAE, and the result names each feature's SAE.

All strengths × prompts are submitted at once (the scheduler batches them), then scored in one call. Up to
SWEEP_INLINE_RUNS generations the answer is inline; above, a Celery job runs it (`steering.tasks.sweep_run`),
reporting `sweep_progress` on /ws/progress/, and GET /api/steering/sweeps/{id} reads it. Every sweep is saved
as a SweepRun.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from asgiref.sync import sync_to_async

from engine.rules import (
    MAX_SWEEP_PROMPTS,
    MAX_SWEEP_RUNS,
    MAX_SWEEP_STRENGTHS,
    MAX_SWEEP_TOKENS,
    SWEEP_INLINE_RUNS,
)
from inference import generation_stream
from inference import messages as m
from inference.client import inference_client
from millm_site.celery import app as celery_app
from millm_site.errors import NotFound, SaeNotAttached, ValidationFailed
from millm_site.events import event_publish
from monitoring.request_tracking import RequestTracker
from steering.calibration_services import feature_recommended_strength
from steering.models import SparseAutoencoder, SweepRun, SweepStatus
from steering.sae_addressing import attached_saes_in_order, strengths_to_raw_by_sae
from steering.steering_options import SteeringOptions, sae_steering_recommendation, steering_options_resolve
from steering.steering_services import attached_sae, steering_message, steering_validate
from steering.token_diff_services import feature_labels

DEFAULT_PROMPTS = ("Tell me about your weekend.", "What do you like to do in the evening?",
                   "Describe the place where you live.")
FLUENCY_MARGIN = 1.0  # nats of mean log-probability below the unsteered outputs' that still count as fluent
AUTO_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
AUTO_CENTER = {"raw": 8.0, "max_activation": 2.0, "residual_norm": 0.5}
TOP_TOKENS = 10  # logit-lens tokens per feature checked in the outputs
DISTINCT_RATIO_MIN, MAX_REPEAT = 0.5, 8

SWEEP_TASK = "steering.tasks.sweep_run"

ProgressSink = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class SweepPlan:
    sae: str
    model: str
    features: list[dict[str, Any]]  # [{index, strength}] base strengths in `options.units`
    strengths: list[float]  # ascending, 0 (the baseline) first
    prompts: list[str]
    max_tokens: int
    chat: bool
    options: dict[str, Any]  # SteeringOptions.as_dict()

    @property
    def runs(self) -> int:
        return len(self.strengths) * len(self.prompts)


def sweep_plan(*, sae: SparseAutoencoder | None, features: list[dict[str, Any]], strengths: list[float] | str,
               prompts: list[str] | None, max_tokens: int = 40, chat: bool = True, mode: str = "additive",
               positions: str = "all", units: str = "raw", layers: list[int] | None = None,
               direction: str = "decoder", preset: str | None = None,
               attached: dict[str, SparseAutoencoder] | None = None, max_steered_tokens: int | None = None,
               until_concept: bool = False) -> SweepPlan:
    """Check a sweep request whole (nothing starts on a refusal) and resolve `auto` and the defaults.
    `attached`: the attached SAEs a feature's `sae` may name."""
    if not features:
        raise ValidationFailed("features: list at least one feature to sweep", details={"field": "features"})
    if sae is None:
        raise SaeNotAttached("No SAE is attached: attach one before sweeping its features")
    options = steering_options_resolve(sae=sae, mode=mode, positions=positions, units=units, layers=layers,
                                       direction=direction, preset=preset, max_steered_tokens=max_steered_tokens,
                                       until_concept=until_concept)
    base = [{"index": f.get("index"), "strength": 1.0 if f.get("strength") is None else f.get("strength"),
             **({"sae": f["sae"]} if isinstance(f, dict) and f.get("sae") is not None else {})} for f in features]
    normalised = steering_validate(sae=sae, features=base, mode=options.mode, positions=options.positions,
                                   units=options.units, attached=attached)
    # The auto grid centres on the features' own calibrated strengths (those swept at their listed values).
    own = [feature_recommended_strength((attached or {}).get(f.get("sae"), sae), f["index"], options.units)
           for f, given in zip(normalised, features, strict=True) if given.get("strength") is None]
    grid = _strength_grid(sae, strengths, options.units, own=[v for v in own if v])
    prompt_list = list(DEFAULT_PROMPTS) if not prompts else list(prompts)
    if len(prompt_list) > MAX_SWEEP_PROMPTS or not all(isinstance(p, str) and p.strip() for p in prompt_list):
        raise ValidationFailed(f"prompts: 1..{MAX_SWEEP_PROMPTS} non-empty prompts", details={"field": "prompts"})
    if not 1 <= max_tokens <= MAX_SWEEP_TOKENS:
        raise ValidationFailed(f"max_tokens: 1..{MAX_SWEEP_TOKENS}", details={"field": "max_tokens"})
    runs = len(grid) * len(prompt_list)
    if runs > MAX_SWEEP_RUNS:
        raise ValidationFailed(f"strengths × prompts: {len(grid)} × {len(prompt_list)} = {runs} generations "
                               f"(the unsteered baseline included); at most {MAX_SWEEP_RUNS}",
                               details={"field": "strengths", "runs": runs, "max_runs": MAX_SWEEP_RUNS})
    # Every strength must stay within the steering bound once multiplied onto the features.
    steering_validate(sae=sae, features=[{**f, "strength": f["strength"] * max(grid, key=abs)} for f in normalised],
                      mode=options.mode, positions=options.positions, units=options.units, attached=attached)
    return SweepPlan(sae=sae.name, model=sae.model.name, features=normalised, strengths=grid, prompts=prompt_list,
                     max_tokens=max_tokens, chat=chat, options=options.as_dict())


def _strength_grid(sae: SparseAutoencoder, strengths: list[float] | str, units: str,
                   own: list[float] | None = None) -> list[float]:
    if strengths == "auto":
        recommendation = sae_steering_recommendation(sae) or {}
        centre = (sum(own) / len(own) if own else
                  recommendation.get("recommended_strength") if recommendation.get("units") == units else None)
        if not isinstance(centre, int | float) or not centre:
            centre = AUTO_CENTER[units]
        values = [round(centre * factor, 6) for factor in AUTO_FACTORS]
    elif isinstance(strengths, list) and strengths:
        values = strengths
    else:
        raise ValidationFailed('strengths: a list of numbers or "auto"', details={"field": "strengths"})
    if any(isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) for v in values):
        raise ValidationFailed("strengths: must be finite numbers", details={"field": "strengths"})
    grid = sorted({0.0, *(float(v) for v in values)})
    if len(grid) > MAX_SWEEP_STRENGTHS:
        raise ValidationFailed(f"strengths: at most {MAX_SWEEP_STRENGTHS} distinct values (0 included)",
                               details={"field": "strengths"})
    return grid


# --- scores ----------------------------------------------------------------------------------------


def degenerate(token_ids: list[int]) -> bool:
    """Distinct-token ratio below 0.5, or one token repeated more than 8 times in a row."""
    if not token_ids:
        return False
    run = longest = 1
    for previous, current in zip(token_ids, token_ids[1:], strict=False):
        run = run + 1 if current == previous else 1
        longest = max(longest, run)
    return len(set(token_ids)) / len(token_ids) < DISTINCT_RATIO_MIN or longest > MAX_REPEAT


def top_token_words(tokens: list[str]) -> set[str]:
    """The logit-lens tokens that are words (≥ 2 letters), lower-cased: what a hit looks for."""
    return {t.strip().lower() for t in tokens if re.fullmatch(r"[^\W\d_]{2,}", t.strip())}


def has_word(text: str, words: set[str]) -> bool:
    found = set(re.findall(r"[^\W\d_]+", text.lower()))
    return bool(found & words)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def sweep_recommend(points: list[dict[str, Any]], *, margin: float = FLUENCY_MARGIN) -> float | None:
    """The strength with the highest concept score whose fluency is within `margin` of the baseline's
    (the point at strength 0) and none of whose answers is degenerate; None when no steered strength keeps
    both and raises the concept score."""
    baseline = next((p for p in points if p["strength"] == 0), None)
    if baseline is None or baseline["fluency"] is None:
        return None
    floor = baseline["concept_score"] or 0.0
    # Repetition is predictable in context, so "France France …" can score fluent: degenerate answers never count.
    fluent = [p for p in points if p["strength"] != 0 and p["fluency"] is not None and p["concept_score"] is not None
              and p["fluency"] >= baseline["fluency"] - margin and p["concept_score"] > floor
              and not p.get("degenerate")]
    if not fluent:
        return None
    return max(fluent, key=lambda p: (p["concept_score"], -abs(p["strength"])))["strength"]


# --- running ---------------------------------------------------------------------------------------


async def sweep_execute(plan: SweepPlan, *, on_progress: ProgressSink | None = None) -> dict[str, Any]:
    """Generate every strength × prompt at once, score them in one call, and put the points together."""
    sae = await sync_to_async(SparseAutoencoder.objects.select_related("model").get)(name=plan.sae)
    attached = await sync_to_async(attached_saes_in_order)()
    options = SteeringOptions(**{**plan.options, "layers": tuple(plan.options["layers"])})  # older plans: defaults
    client = inference_client()
    owners = [f.get("sae") or plan.sae for f in plan.features]  # each feature's own SAE
    lenses = await asyncio.gather(*(client.feature_logit_lens(model=plan.model, sae=owner, index=f["index"],
                                                              count=TOP_TOKENS)
                                    for f, owner in zip(plan.features, owners, strict=True)))
    labels = {}
    for name in dict.fromkeys(owners):
        owner = attached.get(name) or sae
        found = await sync_to_async(feature_labels)(sae=owner, indices=[f["index"] for f, o in
                                                                        zip(plan.features, owners, strict=True)
                                                                        if o == name])
        labels.update({(name, index): label for index, label in found.items()})
    # The quoted tokens of a label ("' French', ' Paris'") count too: with direction "concept" the steered
    # direction is not the decoder row the logit lens reads.
    words = set().union(*(top_token_words([t.text for t in lens.promoted]) for lens in lenses),
                        *(top_token_words(re.findall(r"'([^']+)'", label)) for label in labels.values()))
    steerings = {}
    for strength in plan.strengths:
        scaled = [{**f, "strength": f["strength"] * strength} for f in plan.features]
        raw = await sync_to_async(strengths_to_raw_by_sae)(sae=sae, features=scaled, units=options.units,
                                                           attached=attached)
        steerings[strength] = m.Steering() if strength == 0 else steering_message(raw, options)
    cells = [(strength, prompt) for strength in plan.strengths for prompt in plan.prompts]
    done = 0

    async def one(strength: float, prompt: str) -> generation_stream.Generation:
        nonlocal done
        messages = [{"role": "user", "content": prompt}] if plan.chat else None
        result = await generation_stream.collect(generation_stream.generate(
            model=plan.model, prompt=None if plan.chat else prompt, messages=messages,
            params={"max_tokens": plan.max_tokens, "temperature": 0.0}, steering=steerings[strength], monitor=False,
            observer=RequestTracker(endpoint="sweep", model=plan.model)))
        done += 1
        if on_progress is not None:
            await on_progress(0.9 * done / len(cells))  # scoring is the last tenth
        return result

    results = await asyncio.gather(*(one(s, p) for s, p in cells))  # one batch: the scheduler runs them together
    ids = [[t.id for t in r.tokens] for r in results]
    texts = [m.TextToScore(prompt=None if plan.chat else p,
                           messages=[{"role": "user", "content": p}] if plan.chat else None, generated_ids=i)
             for (_, p), i in zip(cells, ids, strict=True)]
    # One scoring call per SAE the features belong to: each feature's concept is read by its own SAE.
    by_sae = {name: [position for position, o in enumerate(owners) if o == name] for name in dict.fromkeys(owners)}
    scored = {name: await client.score_texts(model=plan.model, call=m.ScoreTexts(
        sae=name, features=[plan.features[p]["index"] for p in positions], texts=texts))
              for name, positions in by_sae.items()}
    scores = _merged_scores(scored, by_sae, len(plan.features))
    points = []
    for strength in plan.strengths:
        rows = [(p, r, i, s) for (st, p), r, i, s in zip(cells, results, ids, scores.scores, strict=True)
                if st == strength]
        concept = [_mean(s.feature_means) for _, _, i, s in rows if i]
        fluency = [s.mean_logprob for *_, s in rows if s.mean_logprob is not None]
        points.append({
            "strength": strength,
            "concept_score": _mean([c for c in concept if c is not None]),
            "token_hits": _mean([1.0 if has_word(r.text, words) else 0.0 for _, r, _, _ in rows]),
            "fluency": _mean(fluency),
            "degenerate": _mean([1.0 if degenerate(i) else 0.0 for _, _, i, _ in rows]),
            "outputs": [{"prompt": p, "text": r.text, "tokens": len(i), "mean_logprob": s.mean_logprob,
                         "concept": _mean(s.feature_means) if i else None, "degenerate": degenerate(i),
                         "finish_reason": r.finish_reason} for p, r, i, s in rows],
        })
    if on_progress is not None:
        await on_progress(1.0)
    return {"sae": plan.sae, "features": [{**f, "sae": owner, "label": labels.get((owner, f["index"]))}
                                          for f, owner in zip(plan.features, owners, strict=True)],
            "strengths": plan.strengths, "prompts": plan.prompts, "max_tokens": plan.max_tokens, **plan.options,
            "top_tokens": sorted(words), "fluency_margin": FLUENCY_MARGIN, "points": points,
            "recommended_strength": sweep_recommend(points)}


def _merged_scores(scored: dict[str, m.TextScores], by_sae: dict[str, list[int]], count: int) -> m.TextScores:
    """Per text, the feature means of every SAE's call put back in the features' order (the log-probability
    does not depend on the SAE read: the first call's)."""
    first = next(iter(scored.values()))
    if len(scored) == 1:
        return first
    merged = []
    for row, text in enumerate(first.scores):
        means = [0.0] * count
        for name, positions in by_sae.items():
            for position, value in zip(positions, scored[name].scores[row].feature_means, strict=True):
                means[position] = value
        merged.append(text.model_copy(update={"feature_means": means}))
    return m.TextScores(scores=merged)


def sweep_data(run: SweepRun) -> dict[str, Any]:
    return {"id": str(run.id), "status": run.status, "progress": run.progress, "error": run.error or None,
            "created_at": run.created_at.isoformat(), "result": run.result}


async def sweep_start(**request: Any) -> dict[str, Any]:
    """Validate, then answer inline (small) or queue the Celery job (large); saved either way."""
    sae = await sync_to_async(attached_sae)()
    attached = await sync_to_async(attached_saes_in_order)()
    plan = await sync_to_async(sweep_plan)(sae=sae, attached=attached, **request)
    run = await sync_to_async(SweepRun.objects.create)(sae=sae, request=asdict(plan), status=SweepStatus.RUNNING)
    if plan.runs > SWEEP_INLINE_RUNS:
        await sync_to_async(SweepRun.objects.filter(pk=run.pk).update)(status=SweepStatus.QUEUED)
        # By name: the task module imports this one for the job's body.
        await sync_to_async(celery_app.send_task)(SWEEP_TASK, args=[str(run.id)])
        run = await sync_to_async(SweepRun.objects.get)(pk=run.pk)
        return sweep_data(run)
    return await sweep_finish(run, plan)


async def sweep_finish(run: SweepRun, plan: SweepPlan) -> dict[str, Any]:
    """Run the sweep and save its outcome (the inline path and the Celery job)."""
    ordered, reported = asyncio.Lock(), [0.0]

    async def progress(fraction: float) -> None:
        async with ordered:  # generations finish concurrently: the saved and announced progress never goes back
            if fraction < reported[0]:
                return
            reported[0] = fraction
            await sync_to_async(SweepRun.objects.filter(pk=run.pk).update)(progress=round(fraction, 4))
            await event_publish("progress", "sweep_progress", {"id": str(run.id), "progress": round(fraction, 4),
                                                               "status": SweepStatus.RUNNING})

    try:
        result = await sweep_execute(plan, on_progress=progress)
    except Exception as exc:
        await sync_to_async(SweepRun.objects.filter(pk=run.pk).update)(status=SweepStatus.FAILED,
                                                                         error=getattr(exc, "message", "sweep failed"))
        raise
    await sync_to_async(SweepRun.objects.filter(pk=run.pk).update)(status=SweepStatus.DONE, progress=1.0,
                                                                     result=result)
    await event_publish("progress", "sweep_progress", {"id": str(run.id), "progress": 1.0, "status": SweepStatus.DONE})
    return sweep_data(await sync_to_async(SweepRun.objects.get)(pk=run.pk))


def sweep_get(*, sweep_id: str) -> dict[str, Any]:
    run = SweepRun.objects.filter(pk=sweep_id).first() if _is_uuid(sweep_id) else None
    if run is None:
        raise NotFound(f"No sweep {sweep_id!r}")
    return sweep_data(run)


def _is_uuid(value: str) -> bool:
    return bool(re.fullmatch(r"[0-9a-fA-F-]{32,36}", value))
