"""Downloads of models and SAEs from the hub: request, run (in a Celery worker or a command), cancel.

A model download creates its catalog row at once, with status "downloading", so the name is taken
and the pages show it; the row becomes "ready" when the files are in and registered. A download that
fails or is cancelled deletes that placeholder row (no half-registered entry is ever left; the
Download row keeps the error), and a new request may reuse the name. SAE rows need their dimensions,
so an SAE appears in the catalog only once registered. Files of a failed download stay on disk, so
a new request for the same repo and revision skips the files already complete; a cancelled one's
files are removed.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from datetime import timedelta
from fnmatch import fnmatch
from pathlib import Path

import structlog
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.text import slugify

from catalog.asset_facts import config_needs_remote_code, model_facts, sae_facts
from catalog.models import LanguageModel, ModelStatus, Quantization
from catalog.selectors import model_as_dict, model_get
from catalog.services import model_register
from downloads import hub
from downloads.cache_paths import repo_dir, repo_path_validate, revision_validate, tree_remove
from downloads.models import Download, DownloadKind, DownloadStatus
from downloads.progress import (
    DownloadCancelled,
    ProgressListener,
    ProgressReporter,
    download_event,
    progress_event,
)
from downloads.selectors import download_get
from millm_site.errors import Conflict, DownloadFailed, MillmError, ValidationFailed
from steering.models import SparseAutoencoder
from steering.sae_services import sae_register

log = structlog.get_logger("millm.downloads")

DOWNLOAD_STALE_S = 120  # a running download silent this long has lost its worker: cancel acts at once
ACTIVE = (DownloadStatus.QUEUED, DownloadStatus.RUNNING)
Enqueue = Callable[[Download], None]  # queues the transfer once the rows are committed
# Other formats of the same weights, and code unless trusted: never needed by the transformers loader.
_MODEL_SKIP = ("*.onnx", "onnx/*", "*.h5", "*.msgpack", "*.tflite", "*.ot", "*.mlmodel", "coreml/*", "original/*",
               "*.gguf", "flax_model*", "tf_model*")
_TORCH_PICKLES = (".bin", ".pt", ".pth", ".ckpt")
_BYTES_PER_PARAM = {"none": {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0}, "q8": 1.0, "q4": 0.5}


def _catalog_name(raw: str, *, max_length: int) -> str:
    name = raw.strip()
    if not name or slugify(name) != name or len(name) > max_length:
        raise ValidationFailed(f"name {raw!r} must be a slug (letters, digits, '-', '_'), at most {max_length} long",
                               details={"field": "name"})
    return name


def _quantization(raw: str | None) -> str:
    value = (raw or "none").strip().lower()
    if value not in Quantization.values:
        raise ValidationFailed(f"quantization {raw!r} must be one of {', '.join(Quantization.values)}",
                               details={"field": "quantization"})
    return value


def model_download_request(*, repo_id: str, revision: str = "main", quantization: str | None = "none",
                           name: str | None = None, trust_remote_code: bool = False,
                           enqueue: Enqueue | None = None) -> Download:
    """Validate, take the catalog name with a "downloading" row, and queue the transfer with `enqueue`
    (`downloads.tasks.download_enqueue`; None: the caller runs it in-process)."""
    repo_id, revision = hub.repo_id_validate(repo_id), revision_validate(revision or "main")
    quantization = _quantization(quantization)
    name = _catalog_name(name or slugify(repo_id.split("/")[-1].lower()), max_length=100)
    local_dir = repo_dir(settings.MODEL_CACHE_DIR, repo_id, revision)
    try:
        with transaction.atomic():
            if LanguageModel.objects.filter(name=name).exists():
                raise Conflict(f"A model named {name!r} is already in the catalog: delete it or choose another name",
                               details={"field": "name"})
            model = LanguageModel.objects.create(
                name=name, repo_id=repo_id, revision=revision, quantization=quantization, local_path=str(local_dir),
                status=ModelStatus.DOWNLOADING, status_message=f"downloading {repo_id}@{revision}")
            download = Download.objects.create(
                kind=DownloadKind.MODEL, name=name, repo_id=repo_id, revision=revision, quantization=quantization,
                trust_remote_code=trust_remote_code, local_dir=str(local_dir), catalog_model=model,
                task_id=uuid.uuid4().hex if enqueue else "")
            if enqueue:
                transaction.on_commit(lambda: enqueue(download))
    except IntegrityError:  # a concurrent request took the name between the check and the insert
        raise Conflict(f"A model named {name!r} is already in the catalog", details={"field": "name"}) from None
    download_event(download)
    return download


def sae_download_request(*, model: str, repo_id: str = "", path: str = "", release: str = "", sae_id: str = "",
                         revision: str = "main", name: str | None = None, enqueue: Enqueue | None = None) -> Download:
    """An SAE from a hub repo folder, or from a SAELens release + sae id (resolved when the download runs)."""
    target = model_get(name=model)
    if target.status == ModelStatus.DOWNLOADING:
        raise ValidationFailed(f"model {model!r} is still downloading", details={"field": "model"})
    revision = revision_validate(revision or "main")
    if release or sae_id:
        if repo_id or path:
            raise ValidationFailed("give either repo_id (+ path) or release + sae_id, not both",
                                   details={"field": "release"})
        if not (release.strip() and sae_id.strip()):
            raise ValidationFailed("a SAELens release needs both release and sae_id", details={"field": "sae_id"})
        release, sae_id, local_dir = release.strip(), sae_id.strip(), ""
    else:
        repo_id, path = hub.repo_id_validate(repo_id), repo_path_validate(path)
        local_dir = str(repo_dir(settings.SAE_CACHE_DIR, repo_id, revision))
    default = f"{target.name}-{slugify((path or sae_id or repo_id.split('/')[-1]).replace('/', '-'))}"
    name = _catalog_name(name or default[:120], max_length=120)
    with transaction.atomic():
        taken = SparseAutoencoder.objects.filter(name=name).exists() or Download.objects.filter(
            kind=DownloadKind.SAE, name=name, status__in=ACTIVE).exists()
        if taken:
            raise Conflict(f"An SAE named {name!r} is already in the catalog or downloading", details={"field": "name"})
        download = Download.objects.create(
            kind=DownloadKind.SAE, name=name, repo_id=repo_id, revision=revision, path=path, release=release,
            sae_id=sae_id, local_dir=local_dir, catalog_model=target, task_id=uuid.uuid4().hex if enqueue else "")
        if enqueue:
            transaction.on_commit(lambda: enqueue(download))
    download_event(download)
    return download


def download_enqueue_failed(*, download: Download) -> None:
    """The broker refused the task: fail the download rather than leave a queued ghost."""
    _finish(download, DownloadStatus.FAILED, error=DownloadFailed(
        "Could not queue the download: the task broker (Redis) is unreachable", details={"reason": "broker"}))


def download_run(*, download_id: int, token: str | None = None, listener: ProgressListener | None = None) -> Download:
    """Do the transfer and the registration. The token (None: HF_TOKEN) is used for this call only."""
    started = Download.objects.filter(pk=download_id, status=DownloadStatus.QUEUED, cancel_requested=False).update(
        status=DownloadStatus.RUNNING, started_at=timezone.now(), updated_at=timezone.now())
    download = download_get(download_id=download_id)
    if not started:  # cancelled while queued, or already run: nothing to do
        log.info("download_skipped", download=download_id, status=download.status)
        return download
    download_event(download)
    reporter = ProgressReporter(download, listener=listener)
    try:
        if download.kind == DownloadKind.MODEL:
            _run_model(download, reporter, token)
        else:
            _run_sae(download, reporter, token)
    except (DownloadCancelled, KeyboardInterrupt):
        _finish(download, DownloadStatus.CANCELLED)
    except MillmError as exc:
        _finish(download, DownloadStatus.FAILED, error=exc)
    except Exception as exc:  # noqa: BLE001 - recorded on the row; the message never carries a token
        log.exception("download_unexpected_error", download=download_id)
        _finish(download, DownloadStatus.FAILED, error=DownloadFailed(
            f"Unexpected error during the download ({type(exc).__name__}); see the worker log",
            details={"reason": "unexpected"}))
    return download_get(download_id=download_id)


def model_files_select(files: tuple[hub.RepoFile, ...], *, trust_remote_code: bool) -> list[hub.RepoFile]:
    """The files transformers needs: one weight format (safetensors first), config.json first in line."""
    has_safetensors = any(f.path.endswith(".safetensors") for f in files)
    chosen = [
        f for f in files
        if not any(fnmatch(f.path, pattern) for pattern in _MODEL_SKIP)
        and not (has_safetensors and f.path.endswith(_TORCH_PICKLES))
        and (trust_remote_code or not f.path.endswith(".py"))
    ]
    return sorted(chosen, key=lambda f: (f.path != "config.json", f.path))


def _run_model(download: Download, reporter: ProgressReporter, token: str | None) -> None:
    listing = hub.repo_listing(repo_id=download.repo_id, revision=download.revision, endpoint=settings.HF_ENDPOINT,
                               token=token)
    files = model_files_select(listing.files, trust_remote_code=download.trust_remote_code)
    if not files or files[0].path != "config.json":
        raise DownloadFailed(f"{download.repo_id} has no config.json: not a transformers model repo",
                             details={"reason": "not_a_model"})
    local_dir = Path(download.local_dir)

    def after_file(path: str) -> None:
        # Refuse before fetching any weights: the loader never runs repo code unless that was asked for.
        if path == "config.json" and not download.trust_remote_code and config_needs_remote_code(local_dir):
            raise ValidationFailed(f"{download.repo_id} needs its own code (config.json has auto_map); "
                                   "pass trust_remote_code to download it anyway", details={"field": "trust_remote_code"})

    _fetch(download, reporter, listing, files, local_dir, token, after_file=after_file)
    facts = model_facts(local_dir)
    if facts.hidden_size is None or facts.num_layers is None:
        raise ValidationFailed(f"config.json of {download.repo_id} names no hidden size or layer count",
                               details={"field": "config.json"})
    per_param = _BYTES_PER_PARAM.get(download.quantization, 4.0)
    per_param = per_param[facts.dtype] if isinstance(per_param, dict) else per_param
    with transaction.atomic():
        reporter.flush(force=True)  # a cancel that arrived during the last file wins over registration
        model = model_register(
            name=download.name, repo_id=download.repo_id, local_path=local_dir,
            parameter_count=facts.parameter_count, hidden_size=facts.hidden_size, num_layers=facts.num_layers,
            context_length=facts.context_length, dtype=facts.dtype,
            memory_estimate_bytes=int(facts.parameter_count * per_param) if facts.parameter_count else None)
        transaction.on_commit(lambda: progress_event("model_status", model_as_dict(model)))
        _finish(download, DownloadStatus.COMPLETED, catalog_model=model)


def sae_release_resolve(*, release: str, sae_id: str) -> tuple[str, str]:
    """A SAELens release + sae id -> (hub repo id, folder in the repo), from sae-lens' own directory."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory  # ~9 s import

    lookup = get_pretrained_saes_directory().get(release)
    if lookup is None:
        raise ValidationFailed(f"{release!r} is not a SAELens release", details={"field": "release"})
    folder = lookup.saes_map.get(sae_id)
    if folder is None:
        raise ValidationFailed(f"release {release!r} has no SAE {sae_id!r}",
                               details={"field": "sae_id", "examples": list(lookup.saes_map)[:5]})
    if lookup.conversion_func:
        raise ValidationFailed(
            f"release {release!r} stores its SAEs in another format ({lookup.conversion_func}); only releases in "
            "sae-lens' own format (cfg.json + sae_weights.safetensors) can be downloaded", details={"field": "release"})
    return lookup.repo_id, folder


def _run_sae(download: Download, reporter: ProgressReporter, token: str | None) -> None:
    if download.release:
        repo_id, path = sae_release_resolve(release=download.release, sae_id=download.sae_id)
        download.repo_id, download.path = hub.repo_id_validate(repo_id), repo_path_validate(path)
        download.local_dir = str(repo_dir(settings.SAE_CACHE_DIR, download.repo_id, download.revision))
        download.save(update_fields=["repo_id", "path", "local_dir", "updated_at"])
    listing = hub.repo_listing(repo_id=download.repo_id, revision=download.revision, endpoint=settings.HF_ENDPOINT,
                               token=token)
    # Only the folder's own files: SAE repos hold many SAEs, often nested one level below each other.
    prefix = f"{download.path}/" if download.path else ""
    files = [f for f in listing.files if f.path.startswith(prefix) and "/" not in f.path[len(prefix):]]
    if not any(f.path == f"{prefix}cfg.json" for f in files):
        raise DownloadFailed(f"no sae-lens cfg.json in {download.repo_id}/{download.path or '(root)'}",
                             details={"reason": "not_an_sae", "path": download.path})
    local_dir = Path(download.local_dir)
    _fetch(download, reporter, listing, files, local_dir, token)
    folder = local_dir / download.path if download.path else local_dir
    facts = sae_facts(folder)
    model = LanguageModel.objects.filter(pk=download.catalog_model_id).first()
    if model is None:
        raise ValidationFailed("the model this SAE was meant for has been deleted", details={"field": "model"})
    with transaction.atomic():
        reporter.flush(force=True)
        sae = sae_register(
            name=download.name, model=model, repo_id=download.release or download.repo_id,
            sae_id=download.sae_id or download.path, layer=facts.layer, hook_name=facts.hook_name, d_in=facts.d_in,
            d_sae=facts.d_sae, architecture=facts.architecture, local_path=folder)
        transaction.on_commit(lambda: progress_event("sae_status", {
            "name": sae.name, "status": sae.status, "status_message": sae.status_message, "layer": sae.layer}))
        _finish(download, DownloadStatus.COMPLETED, catalog_sae=sae)


def _fetch(download: Download, reporter: ProgressReporter, listing: hub.RepoListing, files: list[hub.RepoFile],
           local_dir: Path, token: str | None, *, after_file: Callable[[str], None] | None = None) -> None:
    root = local_dir.resolve()
    unsafe = [f.path for f in files if ".." in Path(f.path).parts or not (root / f.path).resolve().is_relative_to(root)]
    if unsafe:  # huggingface_hub joins listed names to local_dir as they come: never let one climb out
        raise DownloadFailed(f"The hub listed a file outside the repo folder: {unsafe[0]!r}",
                             details={"reason": "unsafe_path"})
    already = sum(f.size for f in files if _complete_on_disk(local_dir, f))
    _disk_space_check(local_dir, sum(f.size for f in files) - already)
    download.commit, download.bytes_total = listing.commit, sum(f.size for f in files)
    download.save(update_fields=["commit", "bytes_total", "updated_at"])
    for f in files:
        reporter.start_file(f.path, f.size)
        hub.file_download(repo_id=download.repo_id, filename=f.path, commit=listing.commit, local_dir=local_dir,
                          endpoint=settings.HF_ENDPOINT, token=token, progress_class=reporter.progress_class())
        reporter.finish_file()
        if after_file:
            after_file(f.path)
    reporter.flush(force=True)


def _complete_on_disk(local_dir: Path, f: hub.RepoFile) -> bool:
    path = local_dir / f.path
    return path.is_file() and path.stat().st_size == f.size


def _disk_space_check(local_dir: Path, needed: int) -> None:
    """Refuse before the first byte when the files would not fit (keeping DOWNLOAD_MIN_FREE_BYTES free)."""
    probe = local_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free, keep = shutil.disk_usage(probe).free, settings.DOWNLOAD_MIN_FREE_BYTES
    if free < needed + keep:
        raise DownloadFailed(
            f"Not enough disk space in {probe}: {needed:,} bytes to download and {keep:,} to keep free, "
            f"but only {free:,} free",
            details={"reason": "insufficient_disk_space", "needed_bytes": needed, "free_bytes": free,
                     "min_free_bytes": keep})


def _finish(download: Download, status: str, *, error: MillmError | None = None,
            catalog_model: LanguageModel | None = None, catalog_sae: SparseAutoencoder | None = None) -> None:
    """Record the outcome; a failed or cancelled model download takes its placeholder row with it."""
    with transaction.atomic():
        download.status, download.finished_at, download.current_file = status, timezone.now(), ""
        if error is not None:
            download.error_code, download.error_message = error.code, error.message[:2000]
            download.error_details = error.details
        if status == DownloadStatus.COMPLETED:
            download.bytes_done = download.bytes_total or download.bytes_done
            download.catalog_model = catalog_model or download.catalog_model
            download.catalog_sae = catalog_sae
        elif download.kind == DownloadKind.MODEL and download.catalog_model_id:
            LanguageModel.objects.filter(pk=download.catalog_model_id, status=ModelStatus.DOWNLOADING).delete()
            download.catalog_model = None
        # Named fields only: a concurrent cancel's flag must survive this write.
        download.save(update_fields=["status", "finished_at", "current_file", "error_code", "error_message",
                                     "error_details", "bytes_done", "catalog_model", "catalog_sae", "updated_at"])
    if status == DownloadStatus.CANCELLED:
        _files_remove(download)
    log.info("download_finished", download=download.pk, status=status, code=download.error_code or None)
    # After the commit: a page that reacts to "completed" must find the catalog row already there.
    transaction.on_commit(lambda: download_event(download))


def _files_remove(download: Download) -> None:
    folder = Path(download.local_dir) / download.path if download.path else Path(download.local_dir)
    if not download.local_dir:
        return
    in_use = set(LanguageModel.objects.values_list("local_path", flat=True))
    in_use |= set(SparseAutoencoder.objects.values_list("local_path", flat=True))
    in_use |= {d.local_dir for d in Download.objects.filter(status__in=ACTIVE).exclude(pk=download.pk)}
    tree_remove(folder, keep=in_use)


def download_cancel(*, download_id: int) -> Download:
    """Queued: cancelled now. Running: flagged, and the worker stops within a fraction of a second."""
    download = download_get(download_id=download_id)
    if download.status not in ACTIVE:
        raise Conflict(f"Download {download_id} is already {download.status}", details={"status": download.status})
    # Once flagged, a worker can no longer start it (download_run starts only unflagged rows).
    Download.objects.filter(pk=download_id).update(cancel_requested=True)
    download = download_get(download_id=download_id)
    stale = timezone.now() - timedelta(seconds=DOWNLOAD_STALE_S)
    if download.status == DownloadStatus.QUEUED or (
            download.status == DownloadStatus.RUNNING and download.updated_at < stale):
        # Nobody is transferring (not started, or its worker died): finish it here.
        _finish(download, DownloadStatus.CANCELLED)
        _revoke(download.task_id)
    return download_get(download_id=download_id)


def _revoke(task_id: str) -> None:
    if not task_id:
        return
    try:
        from millm_site.celery import app

        app.control.revoke(task_id)
    except Exception as exc:  # noqa: BLE001 - the row's status is what the worker obeys; revoke only saves a start
        log.warning("download_revoke_failed", task_id=task_id, error=type(exc).__name__)
