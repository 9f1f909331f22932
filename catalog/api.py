"""/api/models: the model catalog, and loading/unloading in the inference process."""

from __future__ import annotations

from asgiref.sync import sync_to_async
from ninja import Router

from catalog import selectors, services
from catalog.selectors import model_as_dict
from millm_site.envelope import envelope

router = Router(tags=["models"])


@router.get("", summary="List the models in the catalog")
async def list_models(request):
    models = await sync_to_async(lambda: [model_as_dict(m) for m in selectors.model_list()])()
    return envelope(models)


@router.get("/{name}", summary="One model")
async def get_model(request, name: str):
    return envelope(model_as_dict(await sync_to_async(selectors.model_get)(name=name)))


@router.post("/{name}/load", summary="Load a model in the inference process (replaces the loaded one)")
async def load_model(request, name: str, dtype: str | None = None, quantization: str | None = None):
    model, processes = await services.model_load_request(name=name, dtype=dtype, quantization=quantization)
    return envelope({**model_as_dict(model), "processes": processes})


@router.post("/{name}/unload", summary="Unload a model and free its memory")
async def unload_model(request, name: str):
    model, processes = await services.model_unload_request(name=name)
    return envelope({**model_as_dict(model), "processes": processes})
