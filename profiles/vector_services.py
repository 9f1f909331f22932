"""Stored steering vectors: import (llama.cpp GGUF, repeng JSON, numbers), export, delete, and the vectors of a
steering (per request, the active steering, a profile) resolved to the parts the inference process adds.

Checked whole before anything is stored or applied: a vector of the wrong width is refused naming the width
the model expects, a malformed file with the reason (engine/control_vector_files.py).
"""

from __future__ import annotations

import math
from typing import Any

from asgiref.sync import sync_to_async
from django.db import transaction

from catalog.models import LanguageModel
from engine.control_vector_files import (
    ControlVector,
    ControlVectorFileError,
    control_vector_check,
    read_control_vector_gguf,
    read_repeng_json,
    write_control_vector_gguf,
    write_repeng_json,
)
from engine.rules import MAX_ABS_STRENGTH
from inference import messages as m
from inference.client import inference_client
from millm_site.errors import Conflict, ModelNotLoaded, NotFound, ValidationFailed
from profiles.models import SteeringVector, VectorFormat

MAX_VECTORS_PER_STEERING = 16


def vector_get(*, name: str) -> SteeringVector:
    try:
        return SteeringVector.objects.select_related("model").get(name=name)
    except SteeringVector.DoesNotExist:
        raise NotFound(f"No steering vector named {name!r}", details={"name": name}) from None


def vector_control(vector: SteeringVector) -> ControlVector:
    return read_control_vector_gguf(bytes(vector.data))


def vector_data(vector: SteeringVector) -> dict[str, Any]:
    directions = vector_control(vector).directions
    return {"name": vector.name, "description": vector.description,
            "model": vector.model.name if vector.model else None, "model_hint": vector.model_hint,
            "d_model": vector.d_model, "layers": list(vector.layers), "operation": "add",
            "norms": {str(layer): float((directions[layer].astype("float64") ** 2).sum() ** 0.5)
                      for layer in sorted(directions)},
            "source_format": vector.source_format, "active_strength": vector.active_strength,
            "created_at": vector.created_at.isoformat() if vector.created_at else None}


def _default_model() -> LanguageModel | None:
    return LanguageModel.objects.filter(desired_loaded=True).first()


def check_fits(vector: ControlVector, model: LanguageModel, *, field: str = "vector") -> None:
    """Refuse a vector that does not fit the model's residual stream, naming the width it expects."""
    if model.hidden_size and vector.d_model != model.hidden_size:
        raise ValidationFailed(f"{field}: the vector has width {vector.d_model}; model {model.name} expects "
                               f"{model.hidden_size} (its hidden size)",
                               details={"field": field, "width": vector.d_model, "expected_width": model.hidden_size})
    if model.num_layers:
        outside = [layer for layer in vector.layers if layer >= model.num_layers]
        if outside:
            raise ValidationFailed(f"{field}: layer(s) {outside} outside model {model.name}'s decoder layers "
                                   f"[0, {model.num_layers})", details={"field": field})


def parse_vector(*, format: str, content: Any) -> ControlVector:
    """A control vector from the request: GGUF bytes, repeng's JSON, or {"<layer>": [numbers]}."""
    try:
        if format == VectorFormat.GGUF:
            return read_control_vector_gguf(content)
        if format == VectorFormat.REPENG:
            return read_repeng_json(content)
        if format == VectorFormat.INLINE:
            return read_repeng_json({"model_type": "", "directions": content})
    except ControlVectorFileError as exc:
        raise ValidationFailed(f"file: {exc}", details={"field": "file"}) from None
    raise ValidationFailed(f"format: one of gguf, repeng, inline, got {format!r}", details={"field": "format"})


@transaction.atomic
def vector_save(*, name: str, vector: ControlVector, model: LanguageModel | None, source_format: str,
                description: str = "", replace: bool = False) -> SteeringVector:
    model = model or _default_model()
    if model is None:
        raise ValidationFailed("model: name the model the vector fits (no model is loaded)", details={"field": "model"})
    check_fits(vector, model)
    existing = SteeringVector.objects.filter(name=name).first()
    if existing is not None and not replace:
        raise Conflict(f"A steering vector named {name!r} already exists", details={"field": "name"})
    stored = existing or SteeringVector(name=name)
    stored.description, stored.model, stored.model_hint = description, model, vector.model_hint
    stored.d_model, stored.layers, stored.source_format = vector.d_model, vector.layers, source_format
    # Stored as a GGUF even with a layer-0 direction (served here; export for llama.cpp refuses it then).
    stored.data = write_control_vector_gguf(vector, for_llama_cpp=False)
    stored.save()
    return stored


def vector_import(*, name: str, format: str, content: Any, model: LanguageModel | None = None,
                  description: str = "", replace: bool = False) -> SteeringVector:
    return vector_save(name=name, vector=parse_vector(format=format, content=content), model=model,
                       source_format=format, description=description, replace=replace)


def vector_export(*, vector: SteeringVector, format: str) -> tuple[bytes | dict[str, Any], str]:
    """(content, file name): the GGUF llama.cpp loads with --control-vector, or repeng's JSON."""
    control = vector_control(vector)
    if format == "gguf":
        try:
            return write_control_vector_gguf(control), f"{vector.name}.gguf"
        except ControlVectorFileError as exc:
            raise ValidationFailed(str(exc), details={"field": "format"}) from None
    if format == "repeng":
        return write_repeng_json(control), f"{vector.name}.json"
    raise ValidationFailed(f"format: gguf or repeng, got {format!r}", details={"field": "format"})


def vector_delete(*, vector: SteeringVector) -> None:
    vector.delete()


# --- the vectors of a steering ------------------------------------------------------------------


def _strength(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValidationFailed(f"{field}.strength: must be a finite number", details={"field": f"{field}.strength"})
    if abs(value) > MAX_ABS_STRENGTH:
        raise ValidationFailed(f"{field}.strength: {value} exceeds ±{MAX_ABS_STRENGTH:g}",
                               details={"field": f"{field}.strength"})
    return float(value)


def stored_vector_refs(refs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The active steering and profiles take stored vectors by name: `[{"name", "strength"}]`, checked."""
    checked = []
    for position, ref in enumerate(refs):
        field = f"vectors[{position}]"
        name = ref.get("name") if isinstance(ref, dict) else None
        if not isinstance(name, str) or ref.get("vector") is not None or ref.get("layer") is not None:
            raise ValidationFailed(f"{field}: the active steering and profiles take a stored vector by name "
                                   "(import it first: POST /api/vectors/import)", details={"field": field})
        checked.append({"name": name, "strength": _strength(ref.get("strength", 1.0), field)})
    if len({r["name"] for r in checked}) != len(checked):
        raise ValidationFailed("vectors: a vector is listed twice", details={"field": "vectors"})
    return checked


def vector_parts(refs: list[dict[str, Any]], *, model: LanguageModel | None) -> list[m.VectorPart]:
    """`[{"name", "strength"}]` or `[{"layer", "vector": [...], "strength"}]` as the parts the engine adds,
    each checked against the model (width, layers; None: the loaded model) and the store (names)."""
    if not refs:
        return []
    model = model or _default_model()
    if len(refs) > MAX_VECTORS_PER_STEERING:
        raise ValidationFailed(f"vectors: at most {MAX_VECTORS_PER_STEERING}", details={"field": "vectors"})
    parts: list[m.VectorPart] = []
    for position, ref in enumerate(refs):
        field = f"vectors[{position}]"
        strength = _strength(ref.get("strength", 1.0), field)
        if ref.get("name") is not None:
            if ref.get("vector") is not None or ref.get("layer") is not None:
                raise ValidationFailed(f"{field}: give a stored vector's name, or a layer and a vector, not both",
                                       details={"field": field})
            stored = SteeringVector.objects.select_related("model").filter(name=ref["name"]).first()
            if stored is None:
                raise NotFound(f"{field}.name: no steering vector named {ref['name']!r}",
                               details={"field": f"{field}.name"})
            control, name = vector_control(stored), stored.name
        else:
            layer, values = ref.get("layer"), ref.get("vector")
            if isinstance(layer, bool) or not isinstance(layer, int) or values is None:
                raise ValidationFailed(f"{field}: give a stored vector's name, or a layer and a vector",
                                       details={"field": field})
            try:
                control, name = control_vector_check("", {layer: values}), ""
            except ControlVectorFileError as exc:
                raise ValidationFailed(f"{field}: {exc}", details={"field": field}) from None
        if model is not None:
            check_fits(control, model, field=field)
        parts += [m.VectorPart(layer=layer, values=control.directions[layer].tolist(), strength=strength, name=name)
                  for layer in control.layers]
    return parts


def active_vector_refs() -> list[dict[str, Any]]:
    return [{"name": name, "strength": strength} for name, strength in
            SteeringVector.objects.filter(active_strength__isnull=False).values_list("name", "active_strength")]


def active_vectors_set(refs: list[dict[str, Any]]) -> None:
    """Make exactly these stored vectors part of the active steering (run inside the steering's save)."""
    SteeringVector.objects.exclude(name__in=[r["name"] for r in refs]).update(active_strength=None)
    for ref in refs:
        SteeringVector.objects.filter(name=ref["name"]).update(active_strength=ref["strength"])


# --- the active steering as a control vector --------------------------------------------------


async def steering_vector_export(*, steering: m.Steering, model: str, name: str | None = None,
                                 description: str = "") -> tuple[ControlVector, SteeringVector | None]:
    """The steering compiled by the inference process serving `model` (Σ s_i W_dec[i] at the SAE's layer and
    at each spread layer, plus any vectors) as a control vector; stored under `name` when given."""
    if not model:
        raise ModelNotLoaded("No model is loaded: load one, attach an SAE and steer it first")
    client = inference_client()
    exported = await client.call(m.ExportSteering(steering=steering), m.SteeringExported,
                                 channel=await client.channel_for_model(model))
    control = control_vector_check(exported.model_hint, {p.layer: p.values for p in exported.parts})
    stored = None
    if name:
        catalog_model = await sync_to_async(LanguageModel.objects.filter(name=model).first)()
        stored = await sync_to_async(vector_save)(name=name, vector=control, model=catalog_model,
                                                  source_format=VectorFormat.STEERING, description=description,
                                                  replace=True)
    return control, stored
