"""SAEs and Steering pages: thin views over the same services the API uses."""

from __future__ import annotations

import json

from asgiref.sync import sync_to_async
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_POST

from catalog.models import ModelStatus
from catalog.selectors import model_list
from catalog.views import RECENT_DOWNLOADS, download_row
from downloads import services as download_services
from downloads.selectors import download_as_dict, download_list
from downloads.tasks import download_enqueue
from inference.client import inference_client
from millm_site.errors import MillmError, ModelNotLoaded, SaeNotAttached, ValidationFailed
from millm_site.htmx import error_fragment
from monitoring.inspect_services import text_inspect
from profiles.from_steering import profile_save_from_steering
from steering import steering_services
from steering.calibration_services import (
    calibration_in_progress,
    feature_calibration,
    feature_recommended_strength,
    slider_calibration,
)
from steering.conditions import condition_text
from steering.feature_contexts import contexts_request, contexts_status, feature_corpus_facts
from steering.feature_facts import feature_file_stats, similar_features
from steering.feature_services import feature_label_edit
from steering.models import SaeStatus, SteeringState
from steering.sae_addressing import attached_saes_in_order
from steering.sae_attachment import sae_attach_request, sae_detach_request
from steering.sae_quality import sae_quality
from steering.selectors import feature_search_page, sae_get, sae_list
from steering.steering_options import sae_steering_recommendation
from steering.text_diff import same_share, word_diff
from steering.text_features import MAX_TEXT, SINK_PREFIX, text_top_features
from steering.token_diff_services import token_diff_view

FEATURE_PAGE_SIZE = 25
# Slider range (±) and step per strength unit; raw follows the SAE's residual norm when it is recorded.
SLIDER_RANGES = {"raw": (200.0, 0.5), "max_activation": (20.0, 0.1), "residual_norm": (4.0, 0.01)}


def slider_ranges(sae) -> dict[str, dict[str, float]]:
    ranges = {unit: {"max": limit, "step": step} for unit, (limit, step) in SLIDER_RANGES.items()}
    if sae is not None and sae.residual_norm:
        ranges["raw"] = {"max": float(round(4 * sae.residual_norm)), "step": round(sae.residual_norm / 100, 2) or 0.01}
    return ranges


def _with_quality(sae, default=None):
    sae.quality = sae_quality(sae=sae)
    # Several may be attached: the first attached is the default (a feature without `sae` is one of its).
    sae.is_default = default is not None and sae.pk == default.pk
    return sae


def saes_page(request):
    default = steering_services.attached_sae()
    saes = [_with_quality(s, default) for s in sae_list()]
    downloads = [download_as_dict(d) for d in download_list(kind="sae", limit=RECENT_DOWNLOADS)]
    models = list(model_list().exclude(status=ModelStatus.DOWNLOADING).values_list("name", flat=True))
    return render(request, "steering/saes.html", {"saes": saes, "downloads": downloads, "models": models,
                                                  "nav": "saes"})


@require_POST
def sae_download_action(request):
    """A SAELens release + SAE id, or a hub repo + folder; the answer is the download's live row."""
    form = request.POST
    by_release = form.get("source", "release") == "release"
    fields = ({"release": form.get("release", "").strip(), "sae_id": form.get("sae_id", "").strip()} if by_release
              else {"repo_id": form.get("repo_id", ""), "path": form.get("path", "").strip()})
    if by_release and not (fields["release"] and fields["sae_id"]):
        return error_fragment(request, ValidationFailed("A SAELens release needs both the release and the SAE id"))
    try:
        download = download_services.sae_download_request(
            model=form.get("model", ""), revision=form.get("revision", "") or "main",
            name=form.get("name", "").strip() or None, enqueue=download_enqueue, **fields)
    except MillmError as exc:
        return error_fragment(request, exc)
    return download_row(request, download)


@require_POST
async def sae_attach_action(request, name: str):
    return await _sae_row_after(request, name, attach=True)


@require_POST
async def sae_detach_action(request, name: str):
    return await _sae_row_after(request, name, attach=False)


async def _sae_row_after(request, name: str, *, attach: bool):
    try:
        sae = await sync_to_async(sae_get)(name=name)
        if attach and sae.model.status != "loaded":
            raise ModelNotLoaded(f"Model {sae.model.name} is not loaded: load it on the Models page first")
        await (sae_attach_request(name=name) if attach else sae_detach_request(name=name))
    except MillmError as exc:
        return error_fragment(request, exc)
    sae = await sync_to_async(lambda: _with_quality(sae_list().get(name=name), steering_services.attached_sae()))()
    return await sync_to_async(render)(request, "steering/_sae_row.html", {"s": sae})


def _page_number(request) -> int:
    try:
        return max(1, int(request.GET.get("page", 1)))
    except ValueError:
        return 1


def steering_page(request):
    """The feature browser and the steering panel; an htmx search request gets only the result rows."""
    saes = list(sae_list())
    attached = steering_services.attached_sae()
    chosen = next((s for s in saes if str(s.pk) == request.GET.get("sae")), attached or (saes[0] if saes else None))
    query = request.GET.get("q", "")
    found = (feature_search_page(sae=chosen, query=query, page=_page_number(request), page_size=FEATURE_PAGE_SIZE)
             if chosen else None)
    context = {"saes": saes, "sae": chosen, "attached": attached, "q": query.strip(), "found": found,
               "state": SteeringState.current(), "nav": "steering"}
    if request.htmx and request.htmx.target == "feature-rows":
        return render(request, "steering/_feature_rows.html", context)
    context["recommendation"] = sae_steering_recommendation(attached) if attached else None
    if context["recommendation"] and not context["state"].features:
        context["state"].units = context["recommendation"]["units"]  # the sliders start in the recommended units
    saes_attached = attached_saes_in_order()
    context["attached_saes"] = list(saes_attached.values())
    # e.g. the demo's, computed by the worker after the first `make run` started serving (catalog/demo.py)
    context["calibrating"] = [{"sae": one.name, **status} for one in saes_attached.values()
                              if (status := calibration_in_progress(one)) is not None]
    context["rows"] = _state_rows(context["state"], attached, saes_attached)
    # ?steer= from a feature page adds that SAE's feature (the chosen SAE when attached, else the default).
    target = saes_attached.get(chosen.name, attached) if chosen is not None else attached
    context["pending"] = _add_requested_row(request, context["rows"], target, default=attached)
    context["sweep_on_load"] = attached is not None and request.GET.get("sweep", "").isdigit()
    context["ranges"] = slider_ranges(attached)
    context["range"] = context["ranges"].get(context["state"].units, context["ranges"]["raw"])
    context["ranges_json"] = json.dumps(context["ranges"])
    return render(request, "steering/steering.html", context)


def _state_rows(state: SteeringState, sae, attached: dict | None = None) -> list[dict]:
    """The applied features' sliders, each with its own SAE (a feature names one of the attached SAEs)."""
    if sae is None or state.sae_id != sae.pk:
        return []
    saes = {**(attached or {}), sae.name: sae}
    rows = []
    for f in state.features:
        own = saes.get(f.get("sae") or sae.name)
        if own is None:
            continue  # its SAE was detached: nothing of it is applied any more
        label = own.labels.filter(index=f["index"]).values_list("label", flat=True).first() or ""
        rows.append({**_slider_row(own, f["index"], f["strength"], label, state.units, default=sae),
                     "when_text": condition_text(f.get("when"))})
    return rows


def _slider_row(sae, index: int, strength: float, label: str, units: str, *, new: bool = False,
                default=None) -> dict:
    """A slider's row: its range follows the unit and, when the feature is calibrated, its useful range; the page
    script reads `calibration` (per unit: factor to raw, recommended, low, high) to follow a unit switch. It
    carries its SAE (`sae`, sent with the form): the same index may be steered on two SAEs."""
    calibration = slider_calibration(sae, index) or {}
    return {"index": index, "strength": strength, "label": label, "new": new, "sae": sae.name,
            "other_sae": default is not None and sae.name != default.name,
            "range": feature_slider_range(calibration.get(units), slider_ranges(sae).get(units)),
            "calibration": json.dumps(calibration)}


def feature_slider_range(unit: dict | None, fallback: dict | None) -> dict | None:
    """± twice the top of the feature's useful range, 200 steps across one side; else the unit's default range."""
    if not unit or not unit.get("high"):
        return fallback
    top = float(f"{2 * abs(unit['high']):.2g}")
    return {"max": top, "step": float(f"{top / 200:.2g}")}


def _add_requested_row(request, rows: list[dict], sae, *, default=None) -> bool:
    """`?steer=<index>` (from a feature page of `sae`) adds that feature's slider, not yet applied."""
    wanted = request.GET.get("steer", "") or request.GET.get("sweep", "")  # ?sweep=<index> also runs a sweep
    if sae is None or not wanted.isdigit() or not int(wanted) < sae.d_sae:
        return False
    index = int(wanted)
    if any((row["sae"], row["index"]) == (sae.name, index) for row in rows):
        return False
    label = sae.labels.filter(index=index).first()
    units = SteeringState.current().units if rows else _panel_units(default or sae)
    rows.append(_slider_row(sae, index, _recommended_strength(sae, index, units), label.label if label else "", units,
                            new=True, default=default or sae))
    return True


def _panel_units(sae) -> str:
    recommendation = sae_steering_recommendation(sae) if sae is not None else None
    return recommendation["units"] if recommendation else SteeringState.current().units


def steering_slider(request, index: int):
    """One slider row for the panel, of the attached SAE `add_sae` names (default: the first attached); a
    feature (SAE, index) already in the panel is refused, not added twice — the same index of another SAE is not."""
    default = steering_services.attached_sae()
    sae = default
    try:
        if default is None:
            raise SaeNotAttached("No SAE is attached: attach one on the SAEs page to steer its features")
        if request.GET.get("add_sae"):
            sae = attached_saes_in_order().get(request.GET["add_sae"])
            if sae is None:
                raise SaeNotAttached(f"SAE {request.GET['add_sae']!r} is not attached: attach it on the SAEs page")
        if not 0 <= index < sae.d_sae:
            raise ValidationFailed(f"Feature {index} is outside 0..{sae.d_sae - 1} for SAE {sae.name}")
        indices, names = request.GET.getlist("index"), request.GET.getlist("sae")
        names = names if len(names) == len(indices) else [default.name] * len(indices)
        if (str(index), sae.name) in {(i, n or default.name) for i, n in zip(indices, names, strict=True)}:
            raise ValidationFailed(f"Feature #{index} of {sae.name} is already in the steering panel")
    except MillmError as exc:
        return error_fragment(request, exc)
    label = sae.labels.filter(index=index).first()
    units = request.GET.get("units", "raw")
    ranges = slider_ranges(sae)
    row = _slider_row(sae, index, _recommended_strength(sae, index, units), label.label if label else "", units,
                      new=True, default=default)
    return render(request, "steering/_slider_row.html", {"row": row, "range": ranges.get(units, ranges["raw"]),
                                                        "attached": sae})


def _recommended_strength(sae, index: int, units: str) -> float:
    """Where a new slider starts: the feature's calibrated strength in `units`, else the SAE's preset strength
    (when in its units), else 0."""
    own = feature_recommended_strength(sae, index, units)
    if own is not None:
        return own
    recommendation = sae_steering_recommendation(sae) if sae is not None else None
    return float(recommendation["recommended_strength"]) if recommendation and recommendation["units"] == units else 0.0


def _form_features(request) -> list[dict]:
    indices = request.POST.getlist("index")
    strengths = request.POST.getlist("strength")
    # Each row's SAE (steering/sae_addressing.py): a feature is (SAE, index).
    names = request.POST.getlist("sae")
    names = names if len(names) == len(indices) else [""] * len(indices)
    # Each row's condition as typed ("#88 > 3"; steering/conditions.py parses it), when the form has them.
    whens = request.POST.getlist("when")
    whens = whens if len(whens) == len(indices) else [""] * len(indices)
    features = []
    for index, strength, when, name in zip(indices, strengths, whens, names, strict=False):
        condition = {"when": when} if when.strip() else {}
        if name:
            condition["sae"] = name
        try:
            features.append({"index": int(index), "strength": float(strength), **condition})
        except ValueError:
            features.append({"index": index, "strength": strength, **condition})  # the service names what is wrong
    return features


@require_POST
async def steering_apply_action(request):
    try:
        state = await steering_services.steering_apply(
            features=_form_features(request), mode=request.POST.get("mode", "additive"),
            positions=request.POST.get("positions", "all"), units=request.POST.get("units", "raw"),
            preset=request.POST.get("preset") or None)
    except MillmError as exc:
        return error_fragment(request, exc)
    return await sync_to_async(render)(request, "steering/_applied.html", {"state": state})


@require_POST
async def steering_compare_action(request):
    features = _form_features(request)
    units = request.POST.get("units", "raw")
    try:
        try:
            max_tokens = int(request.POST.get("max_tokens", 48) or 48)
        except ValueError:
            raise ValidationFailed("max_tokens: must be a whole number") from None
        if not 1 <= max_tokens <= 1024:
            raise ValidationFailed("max_tokens: must be between 1 and 1024")
        result = await steering_services.steering_compare(
            prompt=request.POST.get("prompt", "").strip() or "Hello!", features=features,
            mode=request.POST.get("mode", "additive"), positions=request.POST.get("positions", "all"),
            units=units, max_tokens=max_tokens, preset=request.POST.get("preset") or None)
    except MillmError as exc:
        return error_fragment(request, exc)
    before, after = result["unsteered"]["text"], result["steered"]["text"]
    context = {"result": result, "diff": word_diff(before, after), "same": same_share(before, after),
               "typed": features, "units": units, "token_diff": token_diff_view(result["token_diff"])}
    return await sync_to_async(render)(request, "steering/_compare.html", context)


@require_POST
async def steering_save_profile_action(request):
    try:
        profile = await sync_to_async(profile_save_from_steering)(
            name=request.POST.get("profile_name", ""), description=request.POST.get("profile_description", ""),
            features=_form_features(request), mode=request.POST.get("mode", "additive"),
            positions=request.POST.get("positions", "all"), units=request.POST.get("units", "raw"),
            preset=request.POST.get("preset") or None, replace=request.POST.get("profile_replace") == "on")
    except MillmError as exc:
        return error_fragment(request, exc)
    return await sync_to_async(render)(request, "steering/_profile_saved.html",
                  {"profile": profile, "profiles_url": reverse("profiles:profiles")})


@require_POST
async def text_features_action(request):
    """"Top features for this text": inspect it with the attached SAE and rank the features it fired."""
    text = request.POST.get("text", "").strip()
    try:
        if not text:
            raise ValidationFailed("text: type a text to find the features most active on it")
        if len(text) > MAX_TEXT:
            raise ValidationFailed(f"text: at most {MAX_TEXT} characters")
        inspected = await text_inspect(text=SINK_PREFIX + text)
        sae = await sync_to_async(sae_get)(name=inspected["sae"])
    except MillmError as exc:
        return error_fragment(request, exc)
    labels = await sync_to_async(lambda: {i: (label, top) for i, label, top in
                                          sae.labels.values_list("index", "label", "max_activation")})()
    found = text_top_features(inspected["tokens"], labels=labels)
    return await sync_to_async(render)(request, "steering/_text_features.html",
                                       {"found": found, "sae": sae, "text": text})


def feature_page(request, name: str, index: int):
    """One feature: its label (editable), measured statistics, nearest features, and steer it."""
    try:
        sae = sae_get(name=name)
        if not 0 <= index < sae.d_sae:
            raise ValidationFailed(f"Feature {index} is outside 0..{sae.d_sae - 1} for SAE {sae.name}")
    except MillmError as exc:
        return render(request, "steering/feature_missing.html", {"message": exc.message, "nav": "steering"},
                      status=404)
    label = sae.labels.filter(index=index).first()
    state = SteeringState.current()
    # Steered now: this (SAE, index) among the active features (a feature without `sae` is the state's SAE's).
    steered = next((f["strength"] for f in state.features if f["index"] == index
                    and (f.get("sae") or (state.sae.name if state.sae else None)) == sae.name), None)
    context = {"sae": sae, "index": index, "label": label, "stats": feature_file_stats(sae=sae, index=index),
               "similar": similar_features(sae=sae, index=index), "steered": steered, "state": state,
               "recommended": feature_calibration(sae, index, max_activation=label.max_activation if label else None),
               "nav": "steering",
               "recommendation": sae_steering_recommendation(sae),
               "attached": steering_services.attached_sae(), **_contexts_context(sae, index)}
    return render(request, "steering/feature.html", context)


def _feature_sae(name: str, index: int):
    sae = sae_get(name=name)
    if not 0 <= index < sae.d_sae:
        raise ValidationFailed(f"Feature {index} is outside 0..{sae.d_sae - 1} for SAE {sae.name}")
    return sae


def feature_contexts_fragment(request, name: str, index: int):
    """The top-activating contexts, or the build's progress (polled while it runs), or the button to start it."""
    try:
        sae = _feature_sae(name, index)
    except MillmError as exc:
        return error_fragment(request, exc)
    return render(request, "steering/_feature_contexts.html", _contexts_context(sae, index))


def _contexts_context(sae, index: int) -> dict:
    facts = feature_corpus_facts(sae=sae, index=index)
    status = contexts_status(sae=sae)
    return {"sae": sae, "index": index, "corpus": facts, "build": status,
            "percent": round(100 * status["done"] / status["total"]) if status.get("total") else 0}


@require_POST
def feature_contexts_action(request, name: str, index: int):
    try:
        sae = _feature_sae(name, index)
    except MillmError as exc:
        return error_fragment(request, exc)
    contexts_request(sae=sae)
    return render(request, "steering/_feature_contexts.html", _contexts_context(sae, index))


async def feature_logit_lens_fragment(request, name: str, index: int):
    """The tokens the feature's decoder direction promotes and suppresses, read by the inference process."""
    try:
        sae = await sync_to_async(_feature_sae)(name, index)
    except MillmError as exc:
        return error_fragment(request, exc)
    context: dict = {"sae": sae}
    if sae.status != SaeStatus.ATTACHED:
        context["detached"] = True  # the lens needs the model's unembedding: only a loaded model has it
    else:
        try:
            context["lens"] = await inference_client().feature_logit_lens(model=sae.model.name, sae=sae.name,
                                                                          index=index)
        except MillmError as exc:
            context["problem"] = exc.message
    return await sync_to_async(render)(request, "steering/_feature_logit_lens.html", context)


async def feature_live_stats_fragment(request, name: str, index: int):
    """This feature's running statistics from monitoring (since the last reset), when its SAE is attached."""
    context: dict = {"index": index}
    try:
        sae = await sync_to_async(_feature_sae)(name, index)
        if sae.status == SaeStatus.ATTACHED:
            stats = await inference_client().statistics(top=sae.d_sae, by="mean")
            context["total_tokens"] = stats.total_tokens
            context["live"] = next((f for f in stats.top if f.index == index), None)
        else:
            context["detached"] = True
    except MillmError as exc:
        context["problem"] = exc.message
    return await sync_to_async(render)(request, "steering/_feature_live_stats.html", context)


@require_POST
def feature_label_action(request, name: str, index: int):
    try:
        sae = sae_get(name=name)
        label = feature_label_edit(sae=sae, index=index, label=request.POST.get("label", ""),
                                   description=request.POST.get("description", ""))
    except MillmError as exc:
        return error_fragment(request, exc)
    return render(request, "steering/_feature_label.html", {"sae": sae, "index": index, "label": label, "saved": True})
