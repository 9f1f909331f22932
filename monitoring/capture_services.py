"""Live-capture settings: applied by every inference process, then saved, then announced to the pages."""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async

from inference.client import inference_client
from millm_site.errors import ValidationFailed
from millm_site.events import event_publish
from monitoring.models import CaptureSettings


def capture_settings_data(reply: Any, *, processes: dict[str, Any] | None = None) -> dict[str, Any]:
    data = {"enabled": reply.enabled, "top_k": reply.top_k, "features": list(reply.features), "active": reply.active}
    if processes is not None:
        data["processes"] = processes
    return data


async def capture_configure(*, enabled: bool | None = None, top_k: int | None = None,
                            features: list[int] | None = None) -> dict[str, Any]:
    if features is not None and any(i < 0 for i in features):
        raise ValidationFailed("features: indices must be >= 0", details={"field": "features"})
    fanout = await inference_client().configure_monitoring(enabled=enabled, top_k=top_k, features=features)

    def save() -> None:
        row = CaptureSettings.current()
        row.enabled, row.top_k, row.features = fanout.reply.enabled, fanout.reply.top_k, list(fanout.reply.features)
        row.save()

    await sync_to_async(save)()
    data = capture_settings_data(fanout.reply, processes=fanout.report())
    await event_publish("monitoring", "monitoring_state_changed", data)
    return data
