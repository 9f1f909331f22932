"""The active steering: validated here against the catalog, applied by the inference process, then saved.

Order matters for "nothing half-saved": validate → the inference process compiles and applies (it
may refuse, e.g. out of memory) → only then the database row changes and the pages hear of it.
"""

from __future__ import annotations

import math
from typing import Any

from asgiref.sync import sync_to_async

from engine.rules import (
    MAX_ABS_STRENGTH,
    STEERING_MODES,
    STEERING_POSITIONS,
    STRENGTH_UNITS,
    feature_index_problem,
)
from inference import generation_stream
from inference.client import inference_client
from inference.messages import Steering, VectorPart
from millm_site.errors import (
    InvalidFeatureIndex,
    SaeNotAttached,
    ValidationFailed,
)
from millm_site.events import event_publish
from monitoring.live import activation_publisher
from monitoring.request_tracking import RequestTracker
from profiles.models import Profile
from profiles.vector_services import active_vector_refs, active_vectors_set, stored_vector_refs, vector_parts
from steering.conditions import condition_message, condition_normalise, conditions_normalise
from steering.models import SaeStatus, SparseAutoencoder, SteeringState
from steering.sae_addressing import (
    ATTACH_ORDER,
    attached_saes_in_order,
    feature_sae,
    features_fill_recommended_by_sae,
    strengths_to_raw_by_sae,
)
from steering.steering_options import SteeringOptions, steering_options_resolve
from steering.token_diff_services import compare_token_diff

MODES, POSITIONS, UNITS = STEERING_MODES, STEERING_POSITIONS, STRENGTH_UNITS


def attached_sae() -> SparseAutoencoder | None:
    """The default SAE (the first attached, the lowest `attached_order`) when several are attached."""
    return (SparseAutoencoder.objects.select_related("model").filter(status=SaeStatus.ATTACHED)
            .order_by(*ATTACH_ORDER).first())


def steering_validate(*, sae: SparseAutoencoder | None, features: list[dict[str, Any]], mode: str = "additive",
                      positions: str = "all", units: str = "raw",
                      attached: dict[str, SparseAutoencoder] | None = None) -> list[dict[str, Any]]:
    """Check a steering request against the attached SAE; returns the normalised feature list.

    A feature may name another attached SAE (`sae`, from `attached`; steering/sae_addressing.py)."""
    steering_options_resolve(sae=sae, mode=mode, positions=positions, units=units)
    if features and sae is None:
        raise SaeNotAttached("No SAE is attached: attach one before steering its features")
    seen: set[tuple[str, int]] = set()
    normalised = []
    for position, feature in enumerate(features):
        index, strength = feature.get("index"), feature.get("strength")
        field = f"features[{position}]"
        target = feature_sae(feature, field=field, default=sae, attached=attached)  # (SAE, index)
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValidationFailed(f"{field}.index: must be an integer", details={"field": f"{field}.index"})
        if (problem := feature_index_problem(index, target.d_sae)) is not None:
            raise InvalidFeatureIndex(f"{field}.index: {problem} for SAE {target.name}",
                                      details={"field": f"{field}.index", "d_sae": target.d_sae})
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength):
            raise ValidationFailed(f"{field}.strength: must be a finite number", details={"field": f"{field}.strength"})
        if abs(strength) > MAX_ABS_STRENGTH:
            raise ValidationFailed(f"{field}.strength: {strength} exceeds ±{MAX_ABS_STRENGTH:g}",
                                   details={"field": f"{field}.strength"})
        if (target.name, index) in seen:
            raise ValidationFailed(f"{field}.index: feature {index} is listed twice", details={"field": f"{field}.index"})
        seen.add((target.name, index))
        kept = {"sae": target.name} if target.name != sae.name else {}  # the default SAE is implied
        if feature.get("when") is not None:  # a condition on another feature at the same token (steering/conditions.py)
            if mode != "additive":
                raise ValidationFailed(f"{field}.when: conditions apply to additive steering only",
                                       details={"field": f"{field}.when"})
            kept["when"] = condition_normalise(feature["when"], field=f"{field}.when", default_sae=sae,
                                               attached=attached)
        normalised.append({"index": index, "strength": float(strength), **kept})
    return normalised


def steering_data(state: SteeringState) -> dict[str, Any]:
    return {"sae": state.sae.name if state.sae else None, "mode": state.mode, "positions": state.positions,
            "units": state.units, "layers": list(state.layers or ()), "direction": state.direction or "decoder",
            "max_steered_tokens": state.max_steered_tokens, "until_concept": state.until_concept,
            "features": state.features, "abort_when": list(state.abort_when or []), "vectors": active_vector_refs(),
            "source_profile": state.source_profile or None,
            "updated_at": state.updated_at.isoformat() if state.updated_at else None}


async def steering_apply(*, features: list[dict[str, Any]], mode: str = "additive", positions: str = "all",
                         units: str = "raw", layers: list[int] | None = None, direction: str = "decoder",
                         preset: str | None = None, source_profile: str = "",
                         abort_when: list[dict[str, Any]] | None = None,
                         vectors: list[dict[str, Any]] | None = None, max_steered_tokens: int | None = None,
                         until_concept: bool = False) -> dict[str, Any]:
    sae = await sync_to_async(attached_sae)()
    attached = await sync_to_async(attached_saes_in_order)()  # a feature may name any of them (`sae`)
    options = steering_options_resolve(sae=sae, mode=mode, positions=positions, units=units, layers=layers,
                                       direction=direction, preset=preset, max_steered_tokens=max_steered_tokens,
                                       until_concept=until_concept)
    # A feature without a strength gets its calibrated one (steering/calibration_services.py).
    features = await sync_to_async(features_fill_recommended_by_sae)(sae=sae, features=features, units=options.units,
                                                                    attached=attached)
    normalised = steering_validate(sae=sae, features=features, mode=options.mode, positions=options.positions,
                                   units=options.units, attached=attached)
    # Conditions are checked here too, before the inference process hears of anything.
    normalised, aborts = conditions_normalise(features=normalised, abort_when=abort_when, mode=options.mode, sae=sae,
                                              attached=attached)
    raw = (await sync_to_async(strengths_to_raw_by_sae)(sae=sae, features=normalised, units=options.units,
                                                        attached=attached) if sae else [])
    label = f"profile:{source_profile}" if source_profile else "active"
    vector_refs = stored_vector_refs(vectors or [])  # the active steering names stored vectors
    parts = await sync_to_async(vector_parts)(vector_refs, model=sae.model if sae else None)
    fanout = await inference_client().set_steering(steering_message(raw, options, label=label, abort_when=aborts,
                                                                    vectors=parts),
                                                   sae=sae.name if sae else None)

    def save() -> dict[str, Any]:
        state = SteeringState.current()
        state.sae, state.features, state.mode, state.positions = sae, normalised, options.mode, options.positions
        state.units, state.layers, state.direction = options.units, list(options.layers), options.direction
        state.source_profile, state.abort_when = source_profile, aborts
        state.max_steered_tokens, state.until_concept = options.max_steered_tokens, options.until_concept
        state.save()
        active_vectors_set(vector_refs)
        # A profile is active only while its steering is the one applied: any other change ends it.
        Profile.objects.filter(is_active=True).exclude(name=source_profile or None).update(is_active=False)
        return steering_data(state)

    data = {**await sync_to_async(save)(), "processes": fanout.report()}
    await event_publish("monitoring", "steering_changed", data)
    return data


async def steering_clear() -> dict[str, Any]:
    return await steering_apply(features=[])


async def steering_current() -> dict[str, Any]:
    return await sync_to_async(lambda: steering_data(SteeringState.current()))()


def steering_state_message(state: SteeringState) -> Steering | None:
    """What the inference process must apply for the saved state (raw strengths, with its label)."""
    vectors = active_vector_refs()
    if not state.features and not state.abort_when and not vectors:
        return None
    if state.sae is None and not vectors:
        return None
    raw = (strengths_to_raw_by_sae(sae=state.sae, features=state.features, units=state.units,
                                   attached=attached_saes_in_order()) if state.sae else [])
    label = f"profile:{state.source_profile}" if state.source_profile else "active"
    options = SteeringOptions(mode=state.mode, positions=state.positions, units=state.units,
                              layers=tuple(state.layers or ()), direction=state.direction or "decoder",
                              max_steered_tokens=state.max_steered_tokens, until_concept=state.until_concept)
    return steering_message(raw, options, label=label, abort_when=list(state.abort_when or []),
                            vectors=vector_parts(vectors, model=state.sae.model if state.sae else None))


def steering_message(raw: list[dict[str, Any]], options: SteeringOptions, *, label: str = "inline",
                     abort_when: list[dict[str, Any]] | None = None, vectors: list[VectorPart] | None = None,
                     ) -> Steering:
    """The contract's steering for raw-strength features applied with these options (conditions, vectors)."""
    features = [{**f, "when": condition_message(f["when"])} if f.get("when") else f for f in raw]
    return Steering(features=features, mode=options.mode, positions=options.positions, layers=list(options.layers),
                    direction=options.direction, max_steered_tokens=options.max_steered_tokens,
                    until_concept=options.until_concept, label=label,
                    abort_when=[condition_message(c) for c in abort_when or ()], vectors=list(vectors or ()))


async def steering_compare(*, prompt: str, features: list[dict[str, Any]], chat: bool = True, max_tokens: int = 48,
                           mode: str = "additive", positions: str = "all", units: str = "raw",
                           layers: list[int] | None = None, direction: str = "decoder",
                           preset: str | None = None, max_steered_tokens: int | None = None,
                           until_concept: bool = False) -> dict[str, Any]:
    """The same prompt answered greedily without and with the given steering (the active one is ignored)."""
    sae = await sync_to_async(attached_sae)()
    if sae is None:
        raise SaeNotAttached("No SAE is attached: attach one before steering its features")
    options = steering_options_resolve(sae=sae, mode=mode, positions=positions, units=units, layers=layers,
                                       direction=direction, preset=preset, max_steered_tokens=max_steered_tokens,
                                       until_concept=until_concept)
    # A feature without a strength gets its calibrated one (steering/calibration_services.py).
    attached = await sync_to_async(attached_saes_in_order)()
    features = await sync_to_async(features_fill_recommended_by_sae)(sae=sae, features=features, units=options.units,
                                                                    attached=attached)
    normalised = steering_validate(sae=sae, features=features, mode=options.mode, positions=options.positions,
                                   units=options.units, attached=attached)
    raw = await sync_to_async(strengths_to_raw_by_sae)(sae=sae, features=normalised, units=options.units,
                                                       attached=attached)
    messages = [{"role": "user", "content": prompt}] if chat else None
    runs: dict[str, Any] = {}
    ids: dict[str, list[int]] = {}
    steered = steering_message(raw, options)
    for key, steering in (("unsteered", Steering()), ("steered", steered)):
        result = await generation_stream.collect(generation_stream.generate(
            model=sae.model.name, prompt=None if chat else prompt, messages=messages,
            params={"max_tokens": max_tokens, "temperature": 0.0}, steering=steering,
            observer=RequestTracker(endpoint="compare", model=sae.model.name), on_frames=activation_publisher().offer))
        runs[key] = {"text": result.text, "completion_tokens": result.completion_tokens,
                     "finish_reason": result.finish_reason}
        ids[key] = [t.id for t in result.tokens]
    # Per token of the steered answer: both models' log-probabilities, their KL, the changed features.
    token_diff = await compare_token_diff(sae=sae, prompt=None if chat else prompt, messages=messages,
                                          steered_ids=ids["steered"], unsteered_ids=ids["unsteered"], steering=steered)
    # The features as given (filled, in `units`), as /api/steering reports them; the raw numbers steered the text.
    return {**runs, "features": normalised, **options.as_dict(), "token_diff": token_diff}
