"""The Profiles page: list, save from the active steering, edit, rename, delete, activate/deactivate,
import a miStudio file, export. Every action answers with the whole table, so no row can go stale."""

from __future__ import annotations

import json

from asgiref.sync import sync_to_async
from django.db.models import Count
from django.http import JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET, require_POST

from millm_site.errors import MillmError, ValidationFailed
from millm_site.htmx import error_fragment
from profiles import services
from profiles.from_steering import profile_name_check, profile_save_from_steering
from profiles.models import Profile
from steering import steering_services
from steering.models import SteeringState


def _table_context() -> dict:
    state = SteeringState.current()
    profiles = list(Profile.objects.select_related("model", "sae").annotate(feature_count=Count("features")))
    # "active" is read from what is applied (the saved steering), never from a flag that could lag it.
    applied = state.source_profile if state.features else ""
    for profile in profiles:
        profile.applied = profile.name == applied
    return {"profiles": profiles, "state": state}


def profiles_page(request):
    return render(request, "profiles/profiles.html", {**_table_context(), "nav": "profiles"})


async def _table_after(request, action, *, message: str = ""):
    try:
        await action()
    except MillmError as exc:
        return error_fragment(request, exc)
    context = await sync_to_async(_table_context)()
    return await sync_to_async(render)(request, "profiles/_table.html", {**context, "message": message, "badge": True})


@require_POST
async def profile_activate_action(request, name: str):
    return await _table_after(request, lambda: services.profile_activate_and_apply(name=name))


@require_POST
async def profile_deactivate_action(request, name: str):
    async def deactivate():
        profile = await sync_to_async(services.profile_get)(name=name)
        state = await sync_to_async(SteeringState.current)()
        if state.source_profile == profile.name:
            await steering_services.steering_clear()
        await sync_to_async(services.profile_deactivate)(profile=profile)
    return await _table_after(request, deactivate)


@require_POST
async def profile_delete_action(request, name: str):
    async def delete():
        profile = await sync_to_async(services.profile_get)(name=name)
        state = await sync_to_async(SteeringState.current)()
        if state.source_profile == profile.name and state.features:
            await steering_services.steering_clear()  # its steering must not outlive it
        await sync_to_async(services.profile_delete)(profile=profile)
    return await _table_after(request, delete, message=f"Deleted profile {name}.")


@require_POST
async def profile_edit_action(request, name: str):
    new_name = request.POST.get("name", name)

    async def edit():
        profile = await sync_to_async(services.profile_get)(name=name)
        await sync_to_async(services.profile_update_details)(
            profile=profile, name=profile_name_check(new_name), description=request.POST.get("description", "").strip())
    return await _table_after(request, edit, message=f"Saved profile {new_name.strip()}.")


@require_POST
async def profile_from_active_action(request):
    """Save the steering applied now (the Steering panel's last Apply) as a new profile."""
    async def save():
        state = await sync_to_async(SteeringState.current)()
        await sync_to_async(profile_save_from_steering)(
            name=request.POST.get("name", ""), description=request.POST.get("description", ""),
            features=state.features, mode=state.mode, positions=state.positions, units=state.units,
            max_steered_tokens=state.max_steered_tokens, until_concept=state.until_concept,
            replace=request.POST.get("replace") == "on")
    return await _table_after(request, save, message=f"Saved profile {request.POST.get('name', '').strip()}.")


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
        profile = services.profile_import(data=data, replace=request.POST.get("replace") == "on")
    except MillmError as exc:
        return error_fragment(request, exc)
    return render(request, "profiles/_table.html", {**_table_context(), "message": f"Imported profile {profile.name}."})


@require_GET
def profile_export_download(request, name: str):
    try:
        profile = services.profile_get(name=name)
    except MillmError as exc:
        return JsonResponse({"error": exc.message}, status=exc.status)
    response = JsonResponse(services.profile_export(profile=profile), json_dumps_params={"indent": 2})
    response["Content-Disposition"] = f'attachment; filename="{profile.name}.json"'
    return response
