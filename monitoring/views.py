"""Overview, Monitor, History and System pages, and /metrics: thin views over selectors and services."""

from __future__ import annotations

from urllib.parse import urlencode

import psutil
from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET, require_POST

from catalog.selectors import model_list
from millm_site.errors import MillmError, NotFound, ValidationFailed
from millm_site.htmx import error_fragment
from monitoring.capture_services import capture_configure
from monitoring.forms import HistoryFilterForm
from monitoring.heatmap import frame_saes, frames_of_sae, heatmap, user_prompt
from monitoring.history_export import history_export_response
from monitoring.history_selectors import (
    history_choices,
    history_page,
    history_record_get,
)
from monitoring.metrics import CONTENT_TYPE, registry
from monitoring.models import CaptureSettings, RequestRecord
from monitoring.system_status import inference_ping, system_publisher
from steering.models import SparseAutoencoder
from steering.sae_addressing import ATTACH_ORDER
from steering.selectors import sae_list

HISTORY_PAGE_SIZE = 50
METRICS_PING_TIMEOUT_S = 1.0  # a scrape must answer even when the inference process does not


def home_page(request):
    context = {"models": model_list(), "saes": sae_list(), "nav": "home"}
    return render(request, "monitoring/home.html", context)


def monitor_page(request):
    recent = list(RequestRecord.objects.defer("token_features")[:20])
    for record in recent:
        record.user_prompt = user_prompt(record.prompt)
    if request.htmx and request.htmx.target == "recent-requests":  # the table's own poll: its rows alone
        return render(request, "monitoring/_recent_rows.html", {"recent": recent})
    return render(request, "monitoring/monitor.html", {"recent": recent, "nav": "monitor",
                                                       "capture": CaptureSettings.current()})


def _pinned_features(text: str) -> list[int]:
    try:
        return sorted({int(part) for part in text.replace(",", " ").split()})
    except ValueError:
        raise ValidationFailed("features: feature indices, separated by commas or spaces (e.g. 12, 40)",
                               details={"field": "features"}) from None


@require_POST
async def monitor_configure_action(request):
    """The Monitor's controls: capture on/off, top-k, pinned features — the same service as the API."""
    try:
        try:
            top_k = int(request.POST.get("top_k", ""))
        except ValueError:
            raise ValidationFailed("top_k: a whole number between 1 and 100", details={"field": "top_k"}) from None
        data = await capture_configure(enabled=request.POST.get("enabled") == "on", top_k=top_k,
                                       features=_pinned_features(request.POST.get("features", "")))
    except MillmError as exc:
        return error_fragment(request, exc)
    capture = {"enabled": data["enabled"], "top_k": data["top_k"], "features": data["features"]}
    return await sync_to_async(render)(request, "monitoring/_monitor_controls.html", {"capture": capture, "saved": True})


def history_list_page(request):
    """The history table; an htmx request aimed at the table body gets only its rows (and the pager row)."""
    form = HistoryFilterForm(request.GET)
    filters = form.filters()
    page = history_page(filters=filters, page=form.page_number(), page_size=HISTORY_PAGE_SIZE)
    if page.page > page.pages:  # filters narrowed the results under the page asked for: show the last one
        page = history_page(filters=filters, page=page.pages, page_size=HISTORY_PAGE_SIZE)
    context = {"form": form, "filters": filters, "page": page, "query": urlencode(filters.as_query()),
               "nav": "history"}
    if request.htmx and request.htmx.target == "history-rows":
        return render(request, "monitoring/_history_rows.html", context)
    context["choices"] = history_choices()
    return render(request, "monitoring/history.html", context)


def history_detail_page(request, request_id: str):
    try:
        record = history_record_get(request_id=request_id)
    except NotFound as exc:
        return render(request, "monitoring/history_missing.html", {"message": exc.message, "nav": "history"},
                      status=404)
    include_special, per_column = request.GET.get("special") == "1", request.GET.get("scale") == "column"
    # Frames of several SAEs (recorded while several were attached): one SAE's at a time, `?sae=` choosing.
    names = frame_saes(record.token_features)
    asked = request.GET.get("sae") or None
    shown = (asked or names[0]) if names else None
    sae = _frames_sae(record.model_name, shown)
    if asked is not None and (asked not in names if names else sae is None or sae.name != asked):
        message = (f"This request has no features of SAE {asked!r}; its features are of "
                   f"{', '.join(names) or (sae.name if sae else 'no SAE')}.")
        return render(request, "monitoring/history_missing.html",
                      {"title": "No such SAE in this request", "message": message, "nav": "history"}, status=400)
    frames = frames_of_sae(record.token_features, shown) if names else record.token_features
    table = heatmap(frames, labels=_labels_for(sae, frames), include_special=include_special, per_column=per_column)

    def query(**changes) -> str:
        options = {"sae": shown if len(names) > 1 else None, "special": "1" if include_special else None,
                   "scale": "column" if per_column else None, **changes}
        return urlencode({k: v for k, v in options.items() if v})

    context = {"r": record, "table": table, "user_prompt": user_prompt(record.prompt), "special": include_special,
               "heatmap_sae": sae, "heatmap_sae_name": shown,
               "sae_choices": [{"name": n, "query": query(sae=n), "active": n == shown} for n in names]
               if len(names) > 1 else [],
               "special_query": query(special=None if include_special else "1"),
               "scale_query": query(scale=None if per_column else "column"),
               "per_column": per_column, "nav": "history"}
    return render(request, "monitoring/history_detail.html", context)


def _frames_sae(model_name: str, named: str | None):
    """The SAE whose features the shown frames hold: the one they name (`sae`), else the model's default SAE
    (the first attached), whose features frames without `sae` hold."""
    saes = SparseAutoencoder.objects.filter(model__name=model_name)
    return ((saes.filter(name=named).first() if named else None)
            or (saes.order_by("-desired_attached", *ATTACH_ORDER).first() if not named else None))


def _labels_for(sae, frames: list[dict]) -> dict[int, str]:
    """Labels from that SAE for the features these frames name."""
    if sae is None:
        return {}
    indices = {int(k) for frame in frames or [] for k in (frame.get("features") or {})}
    return dict(sae.labels.filter(index__in=indices).values_list("index", "label"))


@require_GET
def history_export_download(request):
    fmt = request.GET.get("format", "csv")
    return history_export_response(filters=HistoryFilterForm(request.GET).filters(),
                                   fmt=fmt if fmt in ("csv", "json") else "csv")


def system_page(request):
    context = {"status": system_publisher.last_status, "alerts": list(system_publisher.alerts),
               "interval_s": settings.SYSTEM_INTERVAL_S, "nav": "system"}
    return render(request, "monitoring/system.html", context)


@require_GET
async def metrics_endpoint(request):
    """Prometheus scrape target; see monitoring/metrics.py for what is counted and where."""
    pong = await inference_ping(timeout=min(settings.INFERENCE_TIMEOUT_S, METRICS_PING_TIMEOUT_S))
    text = registry.exposition(inference=pong, process_rss_bytes=psutil.Process().memory_info().rss)
    return HttpResponse(text, content_type=CONTENT_TYPE)
