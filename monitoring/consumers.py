"""WebSocket consumers for the live pages: each joins one event group and forwards its events."""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncWebsocketConsumer
from django.template import TemplateDoesNotExist
from django.template.loader import render_to_string

from monitoring.system_status import system_publisher


class EventStreamConsumer(AsyncWebsocketConsumer):
    group: str = ""

    async def connect(self) -> None:
        query = parse_qs(self.scope.get("query_string", b"").decode())
        self.wants_json = query.get("format", ["html"])[0] == "json"
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.send_event("connected", {"group": self.group})

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        # The pages only listen; a client message is answered with a reminder, not an error page.
        await self.send_event("ignored", {"reason": "this stream is read-only"})

    async def event_deliver(self, message: dict) -> None:
        await self.send_event(message["kind"], message["payload"])

    async def send_event(self, kind: str, payload: dict) -> None:
        if self.wants_json:
            await self.send(text_data=json.dumps({"kind": kind, "payload": payload}))
            return
        try:
            html = render_to_string(f"events/{kind}.html", {"kind": kind, "payload": payload, "group": self.group})
        except TemplateDoesNotExist:
            html = render_to_string("events/_generic.html", {"kind": kind, "payload": payload, "group": self.group})
        await self.send(text_data=html)


class MonitorConsumer(EventStreamConsumer):
    group = "monitoring"


class SystemConsumer(EventStreamConsumer):
    """The system feed: the first client starts this process's status publisher, the last one stops it."""

    group = "system"
    joined = False

    async def connect(self) -> None:
        await super().connect()
        system_publisher.join(self.channel_name)
        self.joined = True
        if system_publisher.last_status is not None:  # a late joiner sees numbers now, not after an interval
            await self.send_event("system_status", system_publisher.last_status)

    async def disconnect(self, code: int) -> None:
        if self.joined:  # a connect that failed half-way never joined
            system_publisher.leave(self.channel_name)
            self.joined = False
        await super().disconnect(code)


class ProgressConsumer(EventStreamConsumer):
    group = "progress"
