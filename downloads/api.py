"""/api: downloads from the hub, local registration and deletion of catalog entries (logic in services).

Mounted at "/" before the models and SAEs routers: Django resolves a path before the method, so the
literal `models/download` must come ahead of `models/{name}`. The two DELETE operations share their
paths with `GET /models/{name}` and `GET /saes/{name}`, so they are added to those routers
(`catalog_deletes_mount`), each path having one view that dispatches on the method.
"""

from __future__ import annotations

from typing import Any, Literal

from ninja import Query, Router, Schema
from pydantic import Field

from catalog import local_files as catalog_files
from catalog.selectors import model_as_dict
from downloads import services as download_services
from downloads.selectors import download_as_dict, download_get, download_list
from downloads.tasks import download_enqueue
from millm_site.envelope import envelope

router = Router(tags=["downloads"])


class ModelDownloadIn(Schema):
    repo_id: str = Field(min_length=1, max_length=200, description="Hub repo id, e.g. HuggingFaceTB/SmolLM2-135M")
    revision: str = Field("main", min_length=1, max_length=100, description="Branch, tag or commit")
    quantization: str = Field("none", description="none, q8 or q4: recorded for loading")
    name: str | None = Field(None, max_length=100, description="Catalog name (default: the repo's name)")
    trust_remote_code: bool = Field(False, description="Allow a repo whose config needs its own code")


class SaeDownloadIn(Schema):
    model: str = Field(min_length=1, max_length=100, description="Catalog model the SAE reads")
    repo_id: str = Field("", max_length=200, description="Hub repo id (with path), or ...")
    path: str = Field("", max_length=300, description="Folder inside the repo holding cfg.json")
    release: str = Field("", max_length=200, description="... a SAELens release, with sae_id")
    sae_id: str = Field("", max_length=200)
    revision: str = Field("main", min_length=1, max_length=100)
    name: str | None = Field(None, max_length=120)


class DownloadFilter(Schema):
    status: Literal["queued", "running", "completed", "failed", "cancelled"] | None = None
    kind: Literal["model", "sae"] | None = None
    limit: int = Field(100, ge=1, le=1000)


class ModelLocalIn(Schema):
    path: str = Field(min_length=1, max_length=1000, description="Folder under MODEL_CACHE_DIR, SAE_CACHE_DIR "
                                                                   "or MILLM_ASSET_CACHE (relative: MODEL_CACHE_DIR)")
    name: str = Field(min_length=1, max_length=100)
    repo_id: str = Field("", max_length=200, description="Where it came from, for the record")


class SaeLocalIn(Schema):
    path: str = Field(min_length=1, max_length=1000, description="Folder with cfg.json (relative: SAE_CACHE_DIR)")
    model: str = Field(min_length=1, max_length=100)
    name: str = Field("", max_length=120)


@router.post("/models/download", response={202: dict[str, Any]}, summary="Download a model from the hub (queued)")
def model_download(request, payload: ModelDownloadIn):
    download = download_services.model_download_request(**payload.model_dump(), enqueue=download_enqueue)
    return 202, envelope(download_as_dict(download))


@router.post("/saes/download", response={202: dict[str, Any]},
             summary="Download an SAE: repo_id + path, or SAELens release + sae_id (queued)")
def sae_download(request, payload: SaeDownloadIn):
    download = download_services.sae_download_request(**payload.model_dump(), enqueue=download_enqueue)
    return 202, envelope(download_as_dict(download))


@router.get("/downloads", summary="Downloads, newest first")
def downloads(request, filters: Query[DownloadFilter]):
    return envelope([download_as_dict(d) for d in download_list(**filters.model_dump())])


@router.get("/downloads/{download_id}", summary="One download with its progress")
def download(request, download_id: int):
    return envelope(download_as_dict(download_get(download_id=download_id)))


@router.post("/downloads/{download_id}/cancel", summary="Cancel a queued or running download")
def download_cancel(request, download_id: int):
    return envelope(download_as_dict(download_services.download_cancel(download_id=download_id)))


@router.post("/models/register-local", summary="Register a model folder already on disk")
def model_register_local(request, payload: ModelLocalIn):
    return envelope(model_as_dict(catalog_files.model_register_local(**payload.model_dump())))


@router.post("/saes/register-local", summary="Register an SAE folder (sae-lens format) already on disk")
def sae_register_local(request, payload: SaeLocalIn):
    from steering.api import sae_as_dict

    return envelope(sae_as_dict(catalog_files.sae_register_local(**payload.model_dump())))


def delete_model(request, name: str):
    return envelope(catalog_files.model_delete(name=name))


def delete_sae(request, name: str):
    return envelope(catalog_files.sae_delete(name=name))


def catalog_deletes_mount(*, models_router: Router, saes_router: Router) -> None:
    models_router.delete("/{name}", summary="Delete a model, its SAEs and their downloaded files")(delete_model)
    saes_router.delete("/{name}", summary="Delete an SAE and its downloaded files")(delete_sae)
