from django.shortcuts import render
from django.views.decorators.http import require_POST

from catalog import services
from catalog.selectors import model_list
from millm_site.errors import MillmError
from millm_site.htmx import error_fragment


def models_page(request):
    return render(request, "catalog/models.html", {"models": model_list(), "nav": "models"})


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
