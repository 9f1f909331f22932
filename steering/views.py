"""SAEs and Steering pages: thin views over the same services the API uses."""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.shortcuts import render
from django.views.decorators.http import require_POST

from inference.client import inference_client
from millm_site.errors import MillmError
from millm_site.htmx import error_fragment
from steering import steering_services
from steering.models import SteeringState
from steering.selectors import feature_search, sae_get, sae_list


def saes_page(request):
    return render(request, "steering/saes.html", {"saes": sae_list(), "nav": "saes"})


@require_POST
async def sae_attach_action(request, name: str):
    return await _sae_row_after(request, name, attach=True)


@require_POST
async def sae_detach_action(request, name: str):
    return await _sae_row_after(request, name, attach=False)


async def _sae_row_after(request, name: str, *, attach: bool):
    client = inference_client()
    try:
        await sync_to_async(sae_get)(name=name)
        await (client.attach_sae(name) if attach else client.detach_sae(name))
    except MillmError as exc:
        return error_fragment(request, exc)
    sae = await sync_to_async(lambda: sae_list().get(name=name))()
    return render(request, "steering/_sae_row.html", {"s": sae})


def steering_page(request):
    """The feature browser and the steering panel; an htmx search request gets only the result rows."""
    saes = list(sae_list())
    attached = steering_services.attached_sae()
    chosen = next((s for s in saes if str(s.pk) == request.GET.get("sae")), attached or (saes[0] if saes else None))
    query = request.GET.get("q", "")
    features = feature_search(sae=chosen, query=query) if chosen else []
    context = {"saes": saes, "sae": chosen, "attached": attached, "q": query, "features": features,
               "state": SteeringState.current(), "nav": "steering"}
    if request.htmx and request.htmx.target == "feature-rows":
        return render(request, "steering/_feature_rows.html", context)
    context["rows"] = _state_rows(context["state"], chosen)
    return render(request, "steering/steering.html", context)


def _state_rows(state: SteeringState, sae) -> list[dict]:
    labels = dict(sae.labels.values_list("index", "label")) if sae else {}
    return [{"index": f["index"], "strength": f["strength"], "label": labels.get(f["index"], "")} for f in state.features]


def steering_slider(request, index: int):
    sae = steering_services.attached_sae()
    label = sae.labels.filter(index=index).values_list("label", flat=True).first() if sae else ""
    return render(request, "steering/_slider_row.html", {"row": {"index": index, "strength": 0.0, "label": label or ""}})


def _form_features(request) -> list[dict]:
    indices = request.POST.getlist("index")
    strengths = request.POST.getlist("strength")
    features = []
    for index, strength in zip(indices, strengths, strict=False):
        try:
            features.append({"index": int(index), "strength": float(strength)})
        except ValueError:
            features.append({"index": index, "strength": strength})  # the service names what is wrong
    return features


@require_POST
async def steering_apply_action(request):
    try:
        state = await steering_services.steering_apply(
            features=_form_features(request), mode=request.POST.get("mode", "additive"),
            positions=request.POST.get("positions", "all"), units=request.POST.get("units", "raw"))
    except MillmError as exc:
        return error_fragment(request, exc)
    return render(request, "steering/_applied.html", {"state": state})


@require_POST
async def steering_compare_action(request):
    try:
        result = await steering_services.steering_compare(
            prompt=request.POST.get("prompt", "").strip() or "Hello!", features=_form_features(request),
            mode=request.POST.get("mode", "additive"), positions=request.POST.get("positions", "all"),
            units=request.POST.get("units", "raw"), max_tokens=int(request.POST.get("max_tokens", 48) or 48))
    except (MillmError, ValueError) as exc:
        return error_fragment(request, exc if isinstance(exc, MillmError) else MillmError(str(exc)))
    return render(request, "steering/_compare.html", {"result": result})
