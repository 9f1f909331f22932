"""Reads of the download history."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from downloads.models import Download
from millm_site.errors import NotFound


def download_list(*, status: str | None = None, kind: str | None = None, limit: int = 100) -> QuerySet[Download]:
    downloads = Download.objects.select_related("catalog_model", "catalog_sae")
    if status:
        downloads = downloads.filter(status=status)
    if kind:
        downloads = downloads.filter(kind=kind)
    return downloads[:limit]


def download_get(*, download_id: int) -> Download:
    try:
        return Download.objects.select_related("catalog_model", "catalog_sae").get(pk=download_id)
    except Download.DoesNotExist:
        raise NotFound(f"No download with id {download_id}", details={"id": download_id}) from None


def download_as_dict(download: Download) -> dict[str, Any]:
    total = download.bytes_total
    error = ({"code": download.error_code, "message": download.error_message, "details": download.error_details}
             if download.error_code else None)
    return {
        "id": download.pk, "kind": download.kind, "name": download.name, "repo_id": download.repo_id,
        "revision": download.revision, "commit": download.commit, "path": download.path,
        "release": download.release, "sae_id": download.sae_id, "quantization": download.quantization,
        "status": download.status, "bytes_done": download.bytes_done, "bytes_total": total,
        "percent": round(100 * download.bytes_done / total, 1) if total else None,
        "current_file": download.current_file, "error": error, "cancel_requested": download.cancel_requested,
        "model": download.catalog_model.name if download.catalog_model_id else None,
        "sae": download.catalog_sae.name if download.catalog_sae_id else None,
        "created_at": download.created_at.isoformat() if download.created_at else None,
        "started_at": download.started_at.isoformat() if download.started_at else None,
        "finished_at": download.finished_at.isoformat() if download.finished_at else None,
    }
