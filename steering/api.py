"""/api/saes (catalog, attach/detach, features, labels) and /api/steering (the active steering)."""

from __future__ import annotations

from typing import Any, Literal

from ninja import Body, Query, Router, Schema
from pydantic import Field

from engine.rules import (
    MAX_STEERED_TOKENS,
    MAX_STEERING_LAYERS,
    SteeringDirection,
    SteeringMode,
    SteeringPositions,
    StrengthUnit,
)
from millm_site.envelope import envelope
from millm_site.errors import ValidationFailed
from steering import calibration_services, sae_services, selectors, steering_services, sweep_services
from steering.labels_import import parse_labels
from steering.models import LabelSource, SparseAutoencoder
from steering.sae_attachment import sae_attach_request, sae_detach_request
from steering.steering_options import sae_steering_recommendation

saes_router = Router(tags=["saes"])
steering_router = Router(tags=["steering"])


def sae_as_dict(sae: SparseAutoencoder) -> dict[str, Any]:
    return {"name": sae.name, "model": sae.model.name, "repo_id": sae.repo_id, "sae_id": sae.sae_id,
            "layer": sae.layer, "hook_name": sae.hook_name, "d_in": sae.d_in, "d_sae": sae.d_sae,
            "architecture": sae.architecture, "local_path": sae.local_path, "residual_norm": sae.residual_norm,
            "status": sae.status, "status_message": sae.status_message, "desired_attached": sae.desired_attached,
            "steering_recommendation": sae_steering_recommendation(sae)}


@saes_router.get("", summary="List SAEs")
def list_saes(request):
    return envelope([sae_as_dict(s) for s in selectors.sae_list()])


@saes_router.get("/{name}", summary="One SAE")
def get_sae(request, name: str):
    return envelope(sae_as_dict(selectors.sae_get(name=name)))


@saes_router.post("/{name}/attach", summary="Attach the SAE to the loaded model (at its hook layer)")
async def attach_sae(request, name: str):
    sae, processes = await sae_attach_request(name=name)
    return envelope({**sae_as_dict(sae), "processes": processes})


@saes_router.post("/{name}/detach", summary="Detach the SAE (steering stops)")
async def detach_sae(request, name: str):
    sae, processes = await sae_detach_request(name=name)
    return envelope({**sae_as_dict(sae), "processes": processes})


@saes_router.get("/{name}/features", summary="Find features by label text or index")
def sae_features(request, name: str, q: str = "", limit: int = Query(50, ge=1, le=1000)):  # noqa: B008
    sae = selectors.sae_get(name=name)
    labels = selectors.feature_search(sae=sae, query=q, limit=limit)
    # The SAE's preset (steering.json) and each feature's calibrated strengths (calibration.json), when there.
    recommendation = sae_steering_recommendation(sae) or {}
    calibration = calibration_services.sae_calibration(sae)
    rows = []
    for f in labels:
        found = calibration_services.feature_calibration(sae, f.index, max_activation=f.max_activation,
                                                         calibration=calibration) if calibration else None
        units = recommendation.get("units") or (found and "raw")
        own = found["units"].get(units) if found else None
        rows.append({"index": f.index, "label": f.label, "description": f.description, "source": f.source,
                     "max_activation": f.max_activation,
                     "recommended_strength": own["recommended"] if own else recommendation.get("recommended_strength"),
                     "strength_range": [own["low"], own["high"]] if own else recommendation.get("strength_range"),
                     "recommended_units": units, "strengths": found["units"] if found else None,
                     "calibration_source": found["source"] if found else None})
    return envelope(rows)


@saes_router.post("/{name}/calibrate", summary="Compute every feature's recommended strength (a worker task; "
                  "progress as calibration_progress on /ws/progress/)")
def calibrate_sae(request, name: str):
    sae = selectors.sae_get(name=name)
    return envelope(calibration_services.sae_calibrate_request(sae=sae))


@saes_router.get("/{name}/calibration", summary="The calibration's status (state, phase, done, total)")
def sae_calibration_status(request, name: str):
    sae = selectors.sae_get(name=name)
    return envelope({**calibration_services.calibration_status(sae=sae),
                     "calibrated": calibration_services.sae_calibration(sae) is not None})


class LabelFile(Schema):
    content: str = Field(min_length=1, description="Neuronpedia explanations export: JSON list or CSV text")


@saes_router.post("/{name}/labels/import", summary="Import labels (Neuronpedia JSON/CSV); hand edits are kept")
def import_labels(request, name: str, payload: LabelFile):
    sae = selectors.sae_get(name=name)
    count = sae_services.feature_labels_import(sae=sae, labels=parse_labels(payload.content),
                                               source=LabelSource.NEURONPEDIA)
    return envelope({"imported": count})


class ConditionIn(Schema):
    sae: str | None = Field(None, description="the SAE the condition reads (default: the attached one)")
    index: int
    above: float | None = Field(None, allow_inf_nan=False, description="holds where the activation is above this")
    below: float | None = Field(None, allow_inf_nan=False, description="holds where it is below (both: a band)")


class VectorRefIn(Schema):
    name: str = Field(description="a stored steering vector (/api/vectors)")
    strength: float = Field(1.0, allow_inf_nan=False, description="the vector is added times this")


class SteeringFeatureIn(Schema):
    sae: str | None = Field(None, description="the attached SAE the index belongs to (default: the first attached)")
    index: int
    strength: float | None = Field(None, description="in `units`; omitted: the feature's calibrated recommended "
                                   "strength (refused when it has none)")
    when: ConditionIn | None = Field(None, description="steer only on tokens where this condition holds (additive)")


class SteeringIn(Schema):
    features: list[SteeringFeatureIn] = Field(default_factory=list, max_length=256)
    mode: SteeringMode = "additive"
    positions: SteeringPositions = "all"
    units: StrengthUnit = Field(
        "raw", description="raw activation units, or multiples of the feature's typical max activation, "
        "or of the hooked residual stream's median norm")
    layers: list[int] = Field(default_factory=list, max_length=MAX_STEERING_LAYERS,
                              description="additive: also add the direction at these decoder layers, each scaled "
                              "to its own residual norm")
    direction: SteeringDirection = Field("decoder", description="decoder: the feature's decoder row; concept: its "
                                         "concept direction (what makes the model write the concept)")
    preset: Literal["recommended"] | None = Field(
        None, description="recommended: the SAE's measured setting (mode, positions, units, layers, direction, "
        "max_steered_tokens, until_concept)")
    # strict: "3", 2.0 or true are refused rather than read as a number of tokens.
    max_steered_tokens: int | None = Field(None, strict=True, ge=1, le=MAX_STEERED_TOKENS,
                                           description="steer only the first N generated tokens; null: all")
    until_concept: bool = Field(False, strict=True, description="stop steering an answer once it has written one "
                                "of the steered features' concept tokens (logit-lens top tokens for an SAE without)")

    abort_when: list[ConditionIn] = Field(default_factory=list, max_length=64,
                                          description="stop generating at the first token where one holds")
    vectors: list[VectorRefIn] = Field(default_factory=list, max_length=16,
                                       description="stored steering vectors (/api/vectors) added at their layers")

    def options(self) -> dict:
        return {"mode": self.mode, "positions": self.positions, "units": self.units, "layers": self.layers,
                "direction": self.direction, "preset": self.preset,
                "max_steered_tokens": self.max_steered_tokens, "until_concept": self.until_concept}


@steering_router.get("", summary="The active steering")
async def get_steering(request):
    return envelope(await steering_services.steering_current())


@steering_router.put("", summary="Set the active steering (applied to every /v1 request)")
async def set_steering(request, payload: SteeringIn = Body(...)):  # noqa: B008
    features = [f.model_dump(exclude_none=True) for f in payload.features]
    abort_when = [c.model_dump(exclude_none=True) for c in payload.abort_when]
    vectors = [v.model_dump() for v in payload.vectors]
    return envelope(await steering_services.steering_apply(features=features, abort_when=abort_when,
                                                           vectors=vectors, **payload.options()))


@steering_router.delete("", summary="Clear the active steering")
async def clear_steering(request):
    return envelope(await steering_services.steering_clear())


class CompareIn(SteeringIn):
    prompt: str = Field(min_length=1, max_length=20000)
    max_tokens: int = Field(48, ge=1, le=1024)
    chat: bool = True


@steering_router.post("/compare", summary="Answer one prompt steered and unsteered, side by side (greedy)")
async def compare(request, payload: CompareIn):
    return envelope(await steering_services.steering_compare(
        prompt=payload.prompt, chat=payload.chat, max_tokens=payload.max_tokens,
        features=[f.model_dump() for f in payload.features], **payload.options()))


class SweepFeatureIn(Schema):
    sae: str | None = Field(None, description="the feature's SAE, any attached one (default: the first attached)")
    index: int
    strength: float | None = Field(None, description="this feature's strength at sweep strength 1 (default 1)")


class SweepIn(SteeringIn):
    features: list[SweepFeatureIn] = Field(default_factory=list, max_length=256)  # type: ignore[assignment]
    strengths: list[float] | Literal["auto"] = Field(
        "auto", description="multipliers of each feature's strength, in `units`; auto: a geometric grid around "
        "the recommended strength. 0 (the unsteered baseline) is always added")
    prompts: list[str] = Field(default_factory=list, description="empty: a few neutral prompts")
    max_tokens: int = Field(40, ge=1)
    chat: bool = True


@steering_router.post("/sweep", summary="Sweep features over strengths: outputs, concept and fluency scores, "
                      "the recommended strength (large sweeps run as a job)")
async def sweep(request, payload: SweepIn):
    for field in ("abort_when", "vectors"):  # inherited from SteeringIn; a sweep scores feature steering only
        if getattr(payload, field):
            raise ValidationFailed(f"{field}: a sweep steers the listed features only", details={"field": field})
    data = await sweep_services.sweep_start(
        features=[f.model_dump() for f in payload.features], strengths=payload.strengths, prompts=payload.prompts,
        max_tokens=payload.max_tokens, chat=payload.chat, **payload.options())
    return envelope(data)  # status "done" with the result, or "queued": poll GET /api/steering/sweeps/{id}


@steering_router.get("/sweeps/{sweep_id}", summary="One sweep: its status, progress and result")
def get_sweep(request, sweep_id: str):
    return envelope(sweep_services.sweep_get(sweep_id=sweep_id))
