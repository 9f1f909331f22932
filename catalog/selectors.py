"""Reads of the language-model catalog."""

from __future__ import annotations

from django.db.models import QuerySet

from catalog.models import LanguageModel
from millm_site.errors import ModelNotFound


def model_list() -> QuerySet[LanguageModel]:
    return LanguageModel.objects.all()


def model_get(*, name: str) -> LanguageModel:
    try:
        return LanguageModel.objects.get(name=name)
    except LanguageModel.DoesNotExist:
        raise ModelNotFound(f"No model named {name!r}", details={"name": name}) from None


def model_as_dict(model: LanguageModel) -> dict:
    return {
        "name": model.name, "repo_id": model.repo_id, "revision": model.revision, "local_path": model.local_path,
        "parameter_count": model.parameter_count, "hidden_size": model.hidden_size, "num_layers": model.num_layers,
        "context_length": model.context_length, "dtype": model.dtype, "quantization": model.quantization,
        "memory_estimate_bytes": model.memory_estimate_bytes, "status": model.status,
        "status_message": model.status_message, "desired_loaded": model.desired_loaded, "is_demo": model.is_demo,
        "updated_at": model.updated_at.isoformat(),
    }
