"""The Profiles page: list, activate/deactivate, import a miStudio file, export."""

from __future__ import annotations

import json

from asgiref.sync import sync_to_async
from django.db.models import Count
from django.shortcuts import render
from django.views.decorators.http import require_POST

from millm_site.errors import MillmError, ValidationFailed
from millm_site.htmx import error_fragment
from profiles import services
from profiles.models import Profile


def _profiles():
    return Profile.objects.select_related("model", "sae").annotate(feature_count=Count("features"))


def profiles_page(request):
    return render(request, "profiles/profiles.html", {"profiles": _profiles(), "nav": "profiles"})


async def _table_after(request, action):
    try:
        await action
    except MillmError as exc:
        return error_fragment(request, exc)
    profiles = await sync_to_async(list)(_profiles())
    return render(request, "profiles/_table.html", {"profiles": profiles})


@require_POST
async def profile_activate_action(request, name: str):
    return await _table_after(request, services.profile_activate_and_apply(name=name))


@require_POST
async def profile_deactivate_action(request, name: str):
    return await _table_after(request, services.profile_deactivate_and_clear(name=name))


@require_POST
def profile_import_action(request):
    upload = request.FILES.get("file")
    try:
        if upload is None:
            raise ValidationFailed("file: choose a profile JSON file")
        try:
            data = json.loads(upload.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValidationFailed(f"file: not valid JSON ({exc.__class__.__name__})") from None
        services.profile_import(data=data, replace=request.POST.get("replace") == "on")
    except MillmError as exc:
        return error_fragment(request, exc)
    return render(request, "profiles/_table.html", {"profiles": _profiles()})
