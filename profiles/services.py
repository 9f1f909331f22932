"""Writes to steering profiles: create/update, activate, import and export (miStudio JSON)."""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django.db import transaction
from pydantic import ValidationError

from catalog.models import LanguageModel
from engine.rules import feature_index_problem
from millm_site.errors import Conflict, InvalidFeatureIndex, ProfileNotFound, SaeNotAttached, ValidationFailed
from profiles.models import Profile, ProfileFeature
from profiles.schemas import ProfileFile
from profiles.vector_services import stored_vector_refs, vector_parts
from steering.conditions import conditions_normalise
from steering.models import SparseAutoencoder
from steering.selectors import sae_get
from steering.steering_options import steering_options_resolve
from steering.steering_services import attached_sae, steering_apply


def profile_get(*, name: str) -> Profile:
    try:
        return Profile.objects.select_related("model", "sae").prefetch_related("features").get(name=name)
    except Profile.DoesNotExist:
        raise ProfileNotFound(f"No profile named {name!r}", details={"name": name}) from None


def _check_features(features: list[dict[str, Any]], sae: SparseAutoencoder | None) -> None:
    """Indices against each feature's SAE: its `sae` (another SAE of the catalog, steered beside the profile's
    while several are attached; the profile's own name means the profile's) or the profile's SAE."""
    seen: set[tuple[str, int]] = set()
    for position, feature in enumerate(features):
        index, target = feature["index"], sae
        if feature.get("sae") is not None and (sae is None or feature["sae"] != sae.name):
            target = sae_get(name=feature["sae"])  # SAE_NOT_FOUND for a name the catalog lacks
        elif "sae" in feature:
            feature.pop("sae")  # the profile's own SAE: the default, stored as such
        key = (target.name if target is not None else "", index)
        if key in seen:
            raise ValidationFailed(f"features[{position}].index: feature {index} is listed twice",
                                   details={"field": f"features[{position}].index"})
        seen.add(key)
        if target is not None and (problem := feature_index_problem(index, target.d_sae)) is not None:
            raise InvalidFeatureIndex(f"features[{position}].index: {problem} for SAE {target.name}",
                                      details={"field": f"features[{position}].index"})


@transaction.atomic
def profile_save(*, name: str, description: str = "", model: LanguageModel | None = None,
                 sae: SparseAutoencoder | None = None, mode: str = "additive", positions: str = "all",
                 layers: list[int] | tuple[int, ...] = (), direction: str = "decoder",
                 features: list[dict[str, Any]], replace: bool = False,
                 abort_when: list[dict[str, Any]] | None = None, vectors: list[dict[str, Any]] | None = None,
                 max_steered_tokens: int | None = None, until_concept: bool = False) -> Profile:
    """Create (or, with replace, overwrite) a profile and its features in one transaction."""
    if sae is not None and model is not None and sae.model_id != model.pk:
        raise ValidationFailed(f"sae: SAE {sae.name} belongs to model {sae.model.name}, not {model.name}",
                               details={"field": "sae"})
    options = steering_options_resolve(sae=sae, mode=mode, positions=positions, layers=layers, direction=direction,
                                       max_steered_tokens=max_steered_tokens, until_concept=until_concept)
    _check_features(features, sae)
    # A condition may read any SAE of the profile's model (attached or not yet: activation checks again).
    saes = {s.name: s for s in SparseAutoencoder.objects.filter(model_id=sae.model_id)} if sae is not None else None
    features, abort_when = conditions_normalise(features=features, abort_when=abort_when, mode=options.mode, sae=sae,
                                                attached=saes, shape_only=sae is None)
    profile = Profile.objects.filter(name=name).first()
    if profile is not None and not replace:
        raise Conflict(f"A profile named {name!r} already exists", details={"field": "name"})
    if profile is None:
        profile = Profile(name=name)
    profile.description, profile.model, profile.sae = description, model, sae
    profile.mode, profile.positions = options.mode, options.positions
    profile.layers, profile.direction = list(options.layers), options.direction
    profile.abort_when = abort_when
    profile.max_steered_tokens, profile.until_concept = options.max_steered_tokens, options.until_concept
    profile.vectors = stored_vector_refs(vectors or [])
    vector_parts(profile.vectors, model=model or (sae.model if sae else None))  # names exist, widths fit
    profile.save()
    profile.features.all().delete()
    ProfileFeature.objects.bulk_create([
        ProfileFeature(profile=profile, index=f["index"], strength=f["strength"], label=f.get("label", ""),
                       when=f.get("when"), sae=f.get("sae") or "")
        for f in features
    ])
    return profile


def profile_import(*, data: Any, replace: bool = False) -> Profile:
    """Import a miStudio profile file; a bad file is refused whole, naming the field."""
    try:
        parsed = ProfileFile.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"]) or "(file)"
        raise ValidationFailed(f"{field}: {error['msg']}", details={"field": field}) from None
    model = _find_model(parsed)
    sae = _find_sae(parsed, model)
    return profile_save(name=parsed.name, description=parsed.description, model=model, sae=sae, mode=parsed.mode,
                        positions=parsed.positions, layers=parsed.layers, direction=parsed.direction,
                        features=[f.model_dump(exclude_none=True) for f in parsed.features], replace=replace,
                        abort_when=[c.model_dump(exclude_none=True) for c in parsed.abort_when],
                        vectors=[v.model_dump() for v in parsed.vectors],
                        max_steered_tokens=parsed.max_steered_tokens, until_concept=parsed.until_concept)


def _find_model(parsed: ProfileFile) -> LanguageModel | None:
    if parsed.model is None:
        return None
    lookup = {"name": parsed.model.name} if parsed.model.name else {"repo_id": parsed.model.repo_id}
    model = LanguageModel.objects.filter(**lookup).first()
    if model is None:
        raise ValidationFailed(f"model.repo_id: no model {parsed.model.name or parsed.model.repo_id!r} in the catalog",
                               details={"field": "model.repo_id"})
    return model


def _find_sae(parsed: ProfileFile, model: LanguageModel | None) -> SparseAutoencoder | None:
    if parsed.sae is None:
        return None
    saes = SparseAutoencoder.objects.filter(repo_id=parsed.sae.repo_id, layer=parsed.sae.layer)
    if parsed.sae.name:
        saes = SparseAutoencoder.objects.filter(name=parsed.sae.name)
    if model is not None:
        saes = saes.filter(model=model)
    sae = saes.select_related("model").first()
    if sae is None:
        raise ValidationFailed(f"sae.repo_id: no SAE {parsed.sae.repo_id!r} at layer {parsed.sae.layer} "
                               f"for {model.name if model else 'any model'} in the catalog",
                               details={"field": "sae.repo_id"})
    return sae


def profile_export(*, profile: Profile) -> dict[str, Any]:
    return {
        "version": "1.0",
        "name": profile.name,
        "description": profile.description,
        "model": ({"repo_id": profile.model.repo_id, "name": profile.model.name,
                   "quantization": profile.model.quantization.upper() if profile.model.quantization != "none" else None}
                  if profile.model else None),
        "sae": ({"repo_id": profile.sae.repo_id, "layer": profile.sae.layer, "sae_id": profile.sae.sae_id,
                 "name": profile.sae.name} if profile.sae else None),
        "features": [{**({"sae": f.sae} if f.sae else {}), "index": f.index, "strength": f.strength, "label": f.label,
                      **({"when": f.when} if f.when else {})} for f in profile.features.all()],
        "abort_when": list(profile.abort_when or []),
        "vectors": list(profile.vectors or []),
        "mode": profile.mode,
        "positions": profile.positions,
        "layers": list(profile.layers or ()),
        "direction": profile.direction,
        "max_steered_tokens": profile.max_steered_tokens,
        "until_concept": profile.until_concept,
        "created_at": profile.created_at.isoformat().replace("+00:00", "Z"),
        "updated_at": profile.updated_at.isoformat().replace("+00:00", "Z"),
    }


@transaction.atomic
def profile_activate(*, profile: Profile) -> Profile:
    Profile.objects.filter(is_active=True).exclude(pk=profile.pk).update(is_active=False)
    if not profile.is_active:
        profile.is_active = True
        profile.save(update_fields=["is_active", "updated_at"])
    return profile


def profile_deactivate(*, profile: Profile) -> Profile:
    if profile.is_active:
        profile.is_active = False
        profile.save(update_fields=["is_active", "updated_at"])
    return profile


def profile_delete(*, profile: Profile) -> None:
    profile.delete()


@transaction.atomic
def profile_update_details(*, profile: Profile, name: str, description: str) -> Profile:
    """Rename a profile and/or change its description; an active profile keeps its name (the
    inference process reports it on every request), so it is deactivated first by the caller."""
    if name != profile.name:
        if profile.is_active:
            raise Conflict(f"Profile {profile.name} is active: deactivate it before renaming",
                           details={"field": "name"})
        if Profile.objects.filter(name=name).exists():
            raise Conflict(f"A profile named {name!r} already exists", details={"field": "name"})
    profile.name, profile.description = name, description
    profile.save(update_fields=["name", "description", "updated_at"])
    return profile


async def profile_activate_and_apply(*, name: str) -> Profile:
    """Apply the profile's steering in the inference process, then mark it active (nothing half-done)."""
    profile = await sync_to_async(profile_get)(name=name)
    sae = await sync_to_async(attached_sae)()
    if profile.sae_id is not None and (sae is None or sae.pk != profile.sae_id):
        raise SaeNotAttached(f"Profile {name} steers SAE {profile.sae.name}, which is not attached")
    features = [{**({"sae": f.sae} if f.sae else {}), "index": f.index, "strength": f.strength,
                 **({"when": f.when} if f.when else {})} for f in profile.features.all()]
    await steering_apply(features=features, mode=profile.mode, positions=profile.positions,
                         layers=list(profile.layers or ()), direction=profile.direction, source_profile=name,
                         abort_when=list(profile.abort_when or []), vectors=list(profile.vectors or []),
                         max_steered_tokens=profile.max_steered_tokens, until_concept=profile.until_concept)
    return await sync_to_async(profile_activate)(profile=profile)


async def profile_deactivate_and_clear(*, name: str) -> Profile:
    from steering.steering_services import steering_clear

    profile = await sync_to_async(profile_get)(name=name)
    if profile.is_active:
        await steering_clear()
    return await sync_to_async(profile_deactivate)(profile=profile)
