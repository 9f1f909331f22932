"""Writes to the language-model catalog."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asgiref.sync import sync_to_async
from django.db import transaction

from catalog.models import Dtype, LanguageModel, ModelStatus, Quantization
from catalog.selectors import model_as_dict, model_get
from inference.client import inference_client
from millm_site.errors import ValidationFailed
from millm_site.events import event_publish_sync


def model_register(
    *,
    name: str,
    repo_id: str,
    local_path: Path | str,
    parameter_count: int | None = None,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    context_length: int | None = None,
    dtype: str = "float32",
    quantization: str | None = None,  # None: keep what the row has (a download records what was asked)
    memory_estimate_bytes: int | None = None,
    is_demo: bool = False,
) -> LanguageModel:
    """Register (or refresh) a model already on disk as ready to load."""
    model, _ = LanguageModel.objects.update_or_create(
        name=name,
        defaults={
            "repo_id": repo_id,
            "local_path": str(local_path),
            "parameter_count": parameter_count,
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "context_length": context_length,
            "dtype": dtype,
            **({"quantization": quantization} if quantization is not None else {}),
            "memory_estimate_bytes": memory_estimate_bytes,
            "status": ModelStatus.READY,
            "status_message": "",
            "is_demo": is_demo,
        },
    )
    return model


def model_verify_files(*, model: LanguageModel) -> bool:
    """True when the model's folder is on disk; otherwise mark it as an error saying what is missing."""
    present = bool(model.local_path) and (Path(model.local_path) / "config.json").is_file()
    if not present:
        model.status = ModelStatus.ERROR
        model.status_message = f"Files missing: {model.local_path or '(no local path)'}"
        model.save(update_fields=["status", "status_message", "updated_at"])
    elif model.status == ModelStatus.ERROR:
        model.status = ModelStatus.READY
        model.status_message = ""
        model.save(update_fields=["status", "status_message", "updated_at"])
    return present


@transaction.atomic
def model_set_desired_loaded(*, model: LanguageModel | None) -> None:
    """Record which model the inference process should have loaded (restored after a restart)."""
    LanguageModel.objects.filter(desired_loaded=True).update(desired_loaded=False)
    if model is not None:
        LanguageModel.objects.filter(pk=model.pk).update(desired_loaded=True)


async def model_load_request(*, name: str, dtype: str | None = None,
                             quantization: str | None = None) -> tuple[LanguageModel, dict[str, Any]]:
    """Ask the inference process to load a model; returns its catalog row once loaded (or raises)."""
    # Every parameter is checked before the inference process hears of it: loading first unloads
    # the serving model, so a refusal found there would already have changed what is served.
    for field, value, choices in (("dtype", dtype, Dtype), ("quantization", quantization, Quantization)):
        if value is not None and value not in choices.values:
            raise ValidationFailed(f"{field}: must be one of {', '.join(choices.values)}",
                                   details={"field": field, "choices": list(choices.values)})
    model = await sync_to_async(model_get)(name=name)  # MODEL_NOT_FOUND before bothering the inference process
    if model.gguf_file and quantization not in (None, Quantization.NONE):
        raise ValidationFailed("quantization: a GGUF model is dequantized when it loads and cannot be re-quantized; "
                               "load it without quantization", details={"field": "quantization"})
    fanout = await inference_client().load_model(name, dtype=dtype, quantization=quantization)
    return await sync_to_async(model_get)(name=name), fanout.report()


async def model_unload_request(*, name: str) -> tuple[LanguageModel, dict[str, Any]]:
    await sync_to_async(model_get)(name=name)
    fanout = await inference_client().unload_model(name)
    return await sync_to_async(model_get)(name=name), fanout.report()


def model_set_status(*, name: str, status: str, message: str = "", loaded: bool | None = None) -> LanguageModel:
    """Record a model's status (and, with `loaded`, the desired state) and tell the live pages."""
    with transaction.atomic():
        if loaded:
            LanguageModel.objects.filter(desired_loaded=True).exclude(name=name).update(desired_loaded=False)
            LanguageModel.objects.filter(status=ModelStatus.LOADED).exclude(name=name).update(status=ModelStatus.READY)
        model = LanguageModel.objects.get(name=name)
        model.status, model.status_message = status, message[:2000]
        if loaded is not None:
            model.desired_loaded = loaded
        model.save()
    event_publish_sync("progress", "model_status", model_as_dict(model))
    return model
