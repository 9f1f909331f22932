from django.shortcuts import render
from django.views.decorators.http import require_POST

from catalog import services
from catalog.models import Quantization
from catalog.selectors import model_list
from downloads import services as download_services
from downloads.selectors import download_as_dict, download_list
from downloads.tasks import download_enqueue
from millm_site.errors import MillmError
from millm_site.htmx import error_fragment

RECENT_DOWNLOADS = 10


def models_page(request):
    downloads = [download_as_dict(d) for d in download_list(kind="model", limit=RECENT_DOWNLOADS)]
    return render(request, "catalog/models.html", {"models": model_list(), "downloads": downloads,
                                                   "quantizations": Quantization.values, "nav": "models"})


@require_POST
def model_download_action(request):
    """Queue a hub download; the row it answers with is then kept current by /ws/progress/ events."""
    form = request.POST
    try:
        download = download_services.model_download_request(
            repo_id=form.get("repo_id", ""), revision=form.get("revision", "") or "main",
            quantization=form.get("quantization", "none"), name=form.get("name", "").strip() or None,
            trust_remote_code=form.get("trust_remote_code") == "1", enqueue=download_enqueue)
    except MillmError as exc:
        return error_fragment(request, exc)
    return download_row(request, download)


@require_POST
def download_cancel_action(request, download_id: int):
    try:
        download = download_services.download_cancel(download_id=download_id)
    except MillmError as exc:
        return error_fragment(request, exc)
    return download_row(request, download)


def download_row(request, download):
    return render(request, "catalog/_download_row.html", {"d": download_as_dict(download)})


@require_POST
async def model_load_action(request, name: str):
    return await _row_after(request, services.model_load_request(name=name))


@require_POST
async def model_unload_action(request, name: str):
    return await _row_after(request, services.model_unload_request(name=name))


async def _row_after(request, action):
    try:
        model, _processes = await action
    except MillmError as exc:
        return error_fragment(request, exc)
    return render(request, "catalog/_model_row.html", {"m": model})
