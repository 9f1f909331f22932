"""Catalog entries and their files: register a folder already on disk, delete an entry with its files."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils.text import slugify

from catalog.asset_facts import model_facts, sae_facts
from catalog.models import LanguageModel, ModelStatus
from catalog.selectors import model_as_dict, model_get
from catalog.services import model_register
from downloads.cache_paths import local_path_resolve, path_for_client, tree_remove
from downloads.models import Download, DownloadStatus
from downloads.progress import progress_event
from millm_site.errors import Conflict, ValidationFailed
from steering.models import SaeStatus, SparseAutoencoder
from steering.sae_services import sae_register
from steering.selectors import sae_get

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _slug(raw: str, *, max_length: int) -> str:
    if not raw or slugify(raw) != raw or len(raw) > max_length:
        raise ValidationFailed(f"name {raw!r} must be a slug (letters, digits, '-', '_'), at most {max_length} long",
                               details={"field": "name"})
    return raw


def _read_facts(read, folder: Path):
    """The folder's facts; an error names the folder as `<SETTING>/...`, not by the server's absolute path."""
    try:
        return read(folder)
    except ValidationFailed as exc:
        exc.message = exc.message.replace(str(folder), path_for_client(folder))
        exc.args = (exc.message,)
        raise


def model_register_local(*, path: str, name: str, repo_id: str = "") -> LanguageModel:
    """Register a transformers model folder (config.json + weights) found inside the allowed roots."""
    folder = local_path_resolve(path, default_root=settings.MODEL_CACHE_DIR)
    name = _slug(name, max_length=100)
    facts = _read_facts(model_facts, folder)
    if facts.hidden_size is None or facts.num_layers is None:
        raise ValidationFailed(f"config.json in {path!r} names no hidden size or layer count", details={"field": "path"})
    if LanguageModel.objects.filter(name=name).exists():
        raise Conflict(f"A model named {name!r} is already in the catalog", details={"field": "name"})
    model = model_register(
        name=name, repo_id=repo_id or f"local:{folder.name}", local_path=folder,
        parameter_count=facts.parameter_count, hidden_size=facts.hidden_size, num_layers=facts.num_layers,
        context_length=facts.context_length, dtype=facts.dtype,
        memory_estimate_bytes=facts.parameter_count * _BYTES[facts.dtype] if facts.parameter_count else None)
    progress_event("model_status", model_as_dict(model))
    return model


def sae_register_local(*, path: str, model: str, name: str = "") -> SparseAutoencoder:
    """Register a sae-lens SAE folder (cfg.json + sae_weights.safetensors) for a catalog model."""
    folder = local_path_resolve(path, default_root=settings.SAE_CACHE_DIR)
    target = model_get(name=model)
    facts = _read_facts(sae_facts, folder)
    name = _slug(name or slugify(f"{target.name}-{folder.name}")[:120], max_length=120)
    if SparseAutoencoder.objects.filter(name=name).exists():
        raise Conflict(f"An SAE named {name!r} is already in the catalog", details={"field": "name"})
    return sae_register(name=name, model=target, repo_id=f"local:{folder.name}", sae_id="", layer=facts.layer,
                        hook_name=facts.hook_name, d_in=facts.d_in, d_sae=facts.d_sae,
                        architecture=facts.architecture, local_path=folder)


def model_delete(*, name: str) -> dict[str, object]:
    """Remove a model, its SAEs and their downloaded files. Refused while loaded or downloading."""
    model = model_get(name=name)
    if model.status == ModelStatus.DOWNLOADING:
        raise Conflict(f"{name} is downloading: cancel its download instead", details={"status": model.status})
    if model.desired_loaded or model.status in (ModelStatus.LOADED, ModelStatus.LOADING):
        raise Conflict(f"{name} is loaded: unload it first", details={"status": model.status})
    folders = [model.local_path, *model.saes.values_list("local_path", flat=True)]
    with transaction.atomic():
        saes = list(model.saes.values_list("name", flat=True))
        model.delete()  # its SAEs and their labels go with it (on_delete=CASCADE)
    removed = [folder for folder in folders if tree_remove(folder, keep=_paths_in_use())]
    progress_event("model_status", {"name": name, "status": "deleted"})
    return {"name": name, "deleted_saes": saes, "removed_folders": removed}


def sae_delete(*, name: str) -> dict[str, object]:
    sae = sae_get(name=name)
    if sae.desired_attached or sae.status == SaeStatus.ATTACHED:
        raise Conflict(f"{name} is attached: detach it first", details={"status": sae.status})
    folder = sae.local_path
    sae.delete()
    removed = [folder] if tree_remove(folder, keep=_paths_in_use()) else []
    progress_event("sae_status", {"name": name, "status": "deleted"})
    return {"name": name, "removed_folders": removed}


def _paths_in_use() -> set[str]:
    """Folders other entries or running downloads still need: a shared folder is never removed."""
    paths = set(LanguageModel.objects.values_list("local_path", flat=True))
    paths |= set(SparseAutoencoder.objects.values_list("local_path", flat=True))
    paths |= set(Download.objects.filter(status__in=(DownloadStatus.QUEUED, DownloadStatus.RUNNING))
                 .values_list("local_dir", flat=True))
    return paths
