"""Attach and detach an SAE in every inference process serving its model (one path for API and pages)."""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async

from inference.client import inference_client
from steering.models import SparseAutoencoder
from steering.selectors import sae_get


async def sae_attach_request(*, name: str) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Attach; the inference processes record the outcome in the catalog. Returns the fresh row and which
    processes applied it."""
    await sync_to_async(sae_get)(name=name)  # SAE_NOT_FOUND before bothering the inference processes
    fanout = await inference_client().attach_sae(name)
    return await sync_to_async(sae_get)(name=name), fanout.report()


async def sae_detach_request(*, name: str) -> tuple[SparseAutoencoder, dict[str, Any]]:
    await sync_to_async(sae_get)(name=name)
    fanout = await inference_client().detach_sae(name)
    return await sync_to_async(sae_get)(name=name), fanout.report()
