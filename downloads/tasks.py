"""Celery tasks: downloads run in the worker, never inside a web request.

Called with `download_id` by the API (which created the rows), or with the request's fields from
the command line: `celery -A millm_site call downloads.tasks.download_model --kwargs '{"repo_id": ...}'`.
The hub token is the worker's HF_TOKEN: a token never travels through the broker.
"""

from __future__ import annotations

from typing import Any

import structlog

from downloads.models import Download, DownloadKind
from downloads.selectors import download_as_dict
from downloads.services import (
    download_enqueue_failed,
    download_run,
    model_download_request,
    sae_download_request,
)
from millm_site.celery import app

log = structlog.get_logger("millm.downloads")


@app.task(name="downloads.tasks.download_model")
def download_model(download_id: int | None = None, *, repo_id: str = "", revision: str = "main",
                   quantization: str = "none", name: str | None = None, trust_remote_code: bool = False) -> dict[str, Any]:
    if download_id is None:
        download_id = model_download_request(repo_id=repo_id, revision=revision, quantization=quantization, name=name,
                                             trust_remote_code=trust_remote_code).pk
    return download_as_dict(download_run(download_id=download_id))


@app.task(name="downloads.tasks.download_sae")
def download_sae(download_id: int | None = None, *, model: str = "", repo_id: str = "", path: str = "",
                 release: str = "", sae_id: str = "", revision: str = "main", name: str | None = None) -> dict[str, Any]:
    if download_id is None:
        download_id = sae_download_request(model=model, repo_id=repo_id, path=path, release=release, sae_id=sae_id,
                                           revision=revision, name=name).pk
    return download_as_dict(download_run(download_id=download_id))


def download_enqueue(download: Download) -> None:
    """Send a requested download to the worker (the request services take this as their `enqueue`)."""
    task = download_model if download.kind == DownloadKind.MODEL else download_sae
    try:
        task.apply_async(kwargs={"download_id": download.pk}, task_id=download.task_id)
    except Exception as exc:  # noqa: BLE001 - an unreachable broker must not leave a queued ghost
        log.error("download_enqueue_failed", download=download.pk, error=type(exc).__name__)
        download_enqueue_failed(download=download)
