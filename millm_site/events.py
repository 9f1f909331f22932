"""Live events to the pages: one helper to publish, one consumer base to deliver.

Groups: `monitoring` (/ws/monitor/), `system` (/ws/system/), `progress` (/ws/progress/).
Every event is `{"kind": str, "payload": dict}`; consumers send it as JSON (`?format=json`) or as
an HTML fragment for the htmx ws extension (templates/events/<kind>.html, swapped out of band).
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

GROUPS = ("monitoring", "system", "progress")


async def event_publish(group: str, kind: str, payload: dict[str, Any]) -> None:
    if group not in GROUPS:
        raise ValueError(f"unknown event group {group!r}")
    await get_channel_layer().group_send(group, {"type": "event.deliver", "kind": kind, "payload": payload})


def event_publish_sync(group: str, kind: str, payload: dict[str, Any]) -> None:
    async_to_sync(event_publish)(group, kind, payload)
