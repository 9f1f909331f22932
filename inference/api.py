"""/api/models: the model catalog, and loading/unloading in the inference process."""

from __future__ import annotations

from asgiref.sync import sync_to_async
from ninja import Router

from inference import selectors, services
from inference.models import LanguageModel
from millm_site.api import envelope

router = Router(tags=["models"])


def model_data(model: LanguageModel) -> dict:
    return {
        "name": model.name, "repo_id": model.repo_id, "revision": model.revision, "local_path": model.local_path,
        "parameter_count": model.parameter_count, "hidden_size": model.hidden_size, "num_layers": model.num_layers,
        "context_length": model.context_length, "dtype": model.dtype, "quantization": model.quantization,
        "memory_estimate_bytes": model.memory_estimate_bytes, "status": model.status,
        "status_message": model.status_message, "desired_loaded": model.desired_loaded, "is_demo": model.is_demo,
        "updated_at": model.updated_at.isoformat(),
    }


@router.get("", summary="List the models in the catalog")
async def list_models(request):
    models = await sync_to_async(lambda: [model_data(m) for m in selectors.model_list()])()
    return envelope(models)


@router.get("/{name}", summary="One model")
async def get_model(request, name: str):
    return envelope(model_data(await sync_to_async(selectors.model_get)(name=name)))


@router.post("/{name}/load", summary="Load a model in the inference process (replaces the loaded one)")
async def load_model(request, name: str, dtype: str | None = None, quantization: str | None = None):
    model = await services.model_load_request(name=name, dtype=dtype, quantization=quantization)
    return envelope(model_data(model))


@router.post("/{name}/unload", summary="Unload a model and free its memory")
async def unload_model(request, name: str):
    return envelope(model_data(await services.model_unload_request(name=name)))
