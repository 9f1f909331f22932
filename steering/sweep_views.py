"""The Steering page's "Sweep" control: a sweep of the panel's sliders, drawn as a small chart with its outputs.
Small sweeps render at once; a large one renders a fragment that polls its job until it is done."""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.shortcuts import render
from django.views.decorators.http import require_POST

from engine.rules import MAX_SWEEP_TOKENS
from millm_site.errors import MillmError, ValidationFailed
from millm_site.htmx import error_fragment
from steering.sweep_chart import sweep_chart
from steering.sweep_services import AUTO_FACTORS, sweep_get, sweep_start

PAGE_MAX_TOKENS = 32  # the page's sweeps stay short: every strength × prompt is a generation


def _form_features(request) -> tuple[list[dict], list[float] | str]:
    """The panel's sliders as sweep features: each slider's value is the strength at multiplier 1, swept
    × AUTO_FACTORS; sliders all at 0 sweep the auto grid instead."""
    features = []
    indices = request.POST.getlist("index")
    names = request.POST.getlist("sae")  # each slider's SAE (a feature is (SAE, index))
    names = names if len(names) == len(indices) else [""] * len(indices)
    for index, strength, name in zip(indices, request.POST.getlist("strength"), names, strict=False):
        try:
            features.append({"index": int(index), "strength": float(strength), **({"sae": name} if name else {})})
        except ValueError:
            raise ValidationFailed(f"feature {index!r}: strength {strength!r} is not a number") from None
    if features and all(f["strength"] == 0 for f in features):
        return [{**f, "strength": None} for f in features], "auto"
    return features, list(AUTO_FACTORS)


def sweep_context(data: dict) -> dict:
    result = data.get("result")
    return {"sweep": data, "result": result, "chart": sweep_chart(result) if result else None}


@require_POST
async def sweep_action(request):
    try:
        features, strengths = _form_features(request)
        prompt = request.POST.get("prompt", "").strip()
        try:
            max_tokens = min(int(request.POST.get("max_tokens", PAGE_MAX_TOKENS) or PAGE_MAX_TOKENS), PAGE_MAX_TOKENS)
        except ValueError:
            raise ValidationFailed("max_tokens: must be a whole number") from None
        data = await sweep_start(features=features, strengths=strengths, prompts=[prompt] if prompt else None,
                                 max_tokens=max(1, min(max_tokens, MAX_SWEEP_TOKENS)),
                                 mode=request.POST.get("mode", "additive"),
                                 positions=request.POST.get("positions", "all"), units=request.POST.get("units", "raw"),
                                 preset=request.POST.get("preset") or None)
    except MillmError as exc:
        return error_fragment(request, exc)
    return await sync_to_async(render)(request, "steering/_sweep.html", sweep_context(data))


def sweep_fragment(request, sweep_id: str):
    """The polled fragment of a queued or running sweep (and its result once done)."""
    try:
        data = sweep_get(sweep_id=str(sweep_id))
    except MillmError as exc:
        return error_fragment(request, exc)
    return render(request, "steering/_sweep.html", sweep_context(data))
