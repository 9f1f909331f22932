"""/api/vectors: stored steering vectors (list, get, delete), import of llama.cpp control-vector GGUF files and
repeng vectors, export to both, and the active SAE steering saved as a vector (docs/steering.md "Vectors")."""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

from asgiref.sync import sync_to_async
from django.http import HttpResponse, JsonResponse
from ninja import Router, Schema
from pydantic import Field

from catalog.models import LanguageModel
from catalog.selectors import model_get
from millm_site.envelope import envelope
from millm_site.errors import ValidationFailed
from profiles import vector_services
from profiles.models import SteeringVector
from steering.models import SteeringState
from steering.steering_services import steering_state_message

router = Router(tags=["vectors"])

VECTOR_NAME = r"^[-a-zA-Z0-9_]+$"


class VectorImportIn(Schema):
    name: str = Field(min_length=1, max_length=100, pattern=VECTOR_NAME)
    format: Literal["gguf", "repeng", "inline"] = Field(
        description="gguf: `content` is the llama.cpp control-vector file, base64; repeng: repeng's ControlVector "
        "as JSON {model_type, directions: {layer: [...]}}; inline: {layer: [...]}")
    content: Any
    model: str | None = Field(None, description="the catalog model it fits (default: the loaded one)")
    description: str = ""
    replace: bool = False


def _model(name: str | None) -> LanguageModel | None:
    return model_get(name=name) if name else None


def _import(payload: VectorImportIn) -> SteeringVector:
    content = payload.content
    if payload.format == "gguf":
        try:
            content = base64.b64decode(content if isinstance(content, str) else "", validate=True)
        except (binascii.Error, ValueError):
            raise ValidationFailed("content: a GGUF file is sent base64-encoded", details={"field": "content"}) from None
    return vector_services.vector_import(name=payload.name, format=payload.format, content=content,
                                         model=_model(payload.model), description=payload.description,
                                         replace=payload.replace)


@router.get("", summary="List stored steering vectors")
def list_vectors(request):
    return envelope([vector_services.vector_data(v) for v in SteeringVector.objects.select_related("model")])


# JSON only: the API refuses other bodies (a cross-site form cannot post one), so a GGUF travels base64.
@router.post("/import", summary="Import a vector: a llama.cpp control-vector GGUF (base64), repeng's "
             "ControlVector JSON, or numbers per layer")
def import_vector(request, payload: VectorImportIn):
    return envelope(vector_services.vector_data(_import(payload)))


class FromSteeringIn(Schema):
    name: str = Field(min_length=1, max_length=100, pattern=VECTOR_NAME)
    description: str = ""


@router.post("/from-steering", summary="Save the active steering (Σ s_i W_dec[i] at the SAE's layer and each "
             "spread layer, plus its vectors) as a stored vector, to export for llama.cpp")
async def vector_from_steering(request, payload: FromSteeringIn):
    def current():
        state = SteeringState.objects.select_related("sae__model").get_or_create(pk=1)[0]
        return steering_state_message(state), state.sae.model.name if state.sae else (
            LanguageModel.objects.filter(desired_loaded=True).values_list("name", flat=True).first())

    steering, model = await sync_to_async(current)()
    if steering is None:
        raise ValidationFailed("there is no active steering to export: set one with PUT /api/steering",
                               details={"field": "steering"})
    _, stored = await vector_services.steering_vector_export(steering=steering, model=model, name=payload.name,
                                                             description=payload.description)
    return envelope(await sync_to_async(vector_services.vector_data)(stored))


@router.get("/{name}", summary="One stored vector (its layers and their norms)")
def get_vector(request, name: str):
    return envelope(vector_services.vector_data(vector_services.vector_get(name=name)))


@router.delete("/{name}", summary="Delete a stored vector")
def delete_vector(request, name: str):
    vector_services.vector_delete(vector=vector_services.vector_get(name=name))
    return envelope({"deleted": name})


@router.get("/{name}/export", summary="The vector as a llama.cpp control-vector GGUF (format=gguf) or repeng JSON")
def export_vector(request, name: str, format: Literal["gguf", "repeng"] = "gguf"):
    content, filename = vector_services.vector_export(vector=vector_services.vector_get(name=name), format=format)
    disposition = {"Content-Disposition": f'attachment; filename="{filename}"'}
    if isinstance(content, dict):
        return JsonResponse(content, headers=disposition)
    return HttpResponse(content, content_type="application/octet-stream", headers=disposition)
