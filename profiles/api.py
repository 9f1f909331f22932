"""/api/profiles: CRUD, activate/deactivate, import/export in the miStudio JSON format."""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from ninja import Body, Router, Schema
from pydantic import Field

from catalog.selectors import model_get
from engine.rules import (
    MAX_STEERED_TOKENS,
    MAX_STEERING_LAYERS,
    SteeringDirection,
    SteeringMode,
    SteeringPositions,
)
from millm_site.envelope import envelope
from profiles import services
from profiles.models import Profile
from profiles.schemas import ConditionFile, ProfileFeatureFile, VectorRefFile
from steering.selectors import sae_get

router = Router(tags=["profiles"])


class ProfileIn(Schema):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[-a-zA-Z0-9_]+$")
    description: str = ""
    model: str | None = None  # catalog name
    sae: str | None = None  # catalog name
    mode: SteeringMode = "additive"
    positions: SteeringPositions = "all"
    layers: list[int] = Field(default_factory=list, max_length=MAX_STEERING_LAYERS)
    direction: SteeringDirection = "decoder"
    features: list[ProfileFeatureFile] = Field(default_factory=list, max_length=1024)
    abort_when: list[ConditionFile] = Field(default_factory=list, max_length=64)
    vectors: list[VectorRefFile] = Field(default_factory=list, max_length=16)
    max_steered_tokens: int | None = Field(None, strict=True, ge=1, le=MAX_STEERED_TOKENS,
                                           description="steer only the first N generated tokens; null: all")
    until_concept: bool = Field(False, strict=True, description="stop steering once a steered concept token is written")


def _save(payload: ProfileIn, *, replace: bool) -> dict[str, Any]:
    model = model_get(name=payload.model) if payload.model else None
    sae = sae_get(name=payload.sae) if payload.sae else None
    profile = services.profile_save(name=payload.name, description=payload.description, model=model, sae=sae,
                                    mode=payload.mode, positions=payload.positions, layers=payload.layers,
                                    direction=payload.direction,
                                    features=[f.model_dump(exclude_none=True) for f in payload.features],
                                    abort_when=[c.model_dump(exclude_none=True) for c in payload.abort_when],
                                    vectors=[v.model_dump() for v in payload.vectors],
                                    max_steered_tokens=payload.max_steered_tokens, until_concept=payload.until_concept,
                                    replace=replace)
    return profile_data(services.profile_get(name=profile.name))


def profile_data(profile: Profile) -> dict[str, Any]:
    return {**services.profile_export(profile=profile), "is_active": profile.is_active,
            "model_name": profile.model.name if profile.model else None,
            "sae_name": profile.sae.name if profile.sae else None}


@router.get("", summary="List profiles")
def list_profiles(request):
    profiles = Profile.objects.select_related("model", "sae").prefetch_related("features")
    return envelope([profile_data(p) for p in profiles])


@router.post("", summary="Create a profile")
def create_profile(request, payload: ProfileIn):
    return envelope(_save(payload, replace=False))


@router.post("/import", summary="Import a miStudio profile file (refused whole if anything is wrong)")
def import_profile(request, payload: dict[str, Any] = Body(...), replace: bool = False):  # noqa: B008
    profile = services.profile_import(data=payload, replace=replace)
    return envelope(profile_data(services.profile_get(name=profile.name)))


@router.get("/{name}", summary="One profile")
def get_profile(request, name: str):
    return envelope(profile_data(services.profile_get(name=name)))


@router.put("/{name}", summary="Replace a profile")
def replace_profile(request, name: str, payload: ProfileIn):
    services.profile_get(name=name)
    if payload.name != name:
        payload.name = name
    return envelope(_save(payload, replace=True))


@router.delete("/{name}", summary="Delete a profile")
def delete_profile(request, name: str):
    services.profile_delete(profile=services.profile_get(name=name))
    return envelope({"deleted": name})


@router.get("/{name}/export", summary="The profile as a miStudio JSON file")
def export_profile(request, name: str):
    return services.profile_export(profile=services.profile_get(name=name))


@router.post("/{name}/activate", summary="Make this the active profile (applied to every /v1 request)")
async def activate_profile(request, name: str):
    profile = await services.profile_activate_and_apply(name=name)
    return envelope(await sync_to_async(profile_data)(profile))


@router.post("/{name}/deactivate", summary="Stop applying this profile (clears the active steering)")
async def deactivate_profile(request, name: str):
    profile = await services.profile_deactivate_and_clear(name=name)
    return envelope(await sync_to_async(profile_data)(profile))

