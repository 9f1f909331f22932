"""WebSocket routes, behind one guard: an allowed Origin, and the key when MILLM_API_KEY is set."""

from __future__ import annotations

from channels.db import database_sync_to_async
from channels.security.websocket import WebsocketDenier
from channels.sessions import SessionMiddlewareStack
from django.conf import settings
from django.urls import path

from millm_site.middleware import key_matches, origin_allowed, presented_key, session_has_key
from monitoring.consumers import MonitorConsumer, ProgressConsumer, SystemConsumer

websocket_urlpatterns = [
    path("ws/monitor/", MonitorConsumer.as_asgi()),
    path("ws/system/", SystemConsumer.as_asgi()),
    path("ws/progress/", ProgressConsumer.as_asgi()),
]


class _Headers(dict):
    """The handshake's headers as `presented_key` reads them (case-insensitive by lower-casing)."""

    def get(self, name: str, default: str = "") -> str:
        return super().get(name.lower(), default)


class WebSocketGuard:
    """Browsers always send Origin, so a foreign one is refused (cross-site WebSocket hijacking); programs
    (`websockets` clients) send none. With a key set, the handshake needs it: by header (programs) or a
    logged-in session cookie (the pages, whose browser cannot add headers to a WebSocket)."""

    def __init__(self, application):
        self.application = application

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and not await self.allowed(scope):
            return await WebsocketDenier()(scope, receive, send)
        return await self.application(scope, receive, send)

    async def allowed(self, scope) -> bool:
        headers = _Headers((k.decode("latin1").lower(), v.decode("latin1")) for k, v in scope.get("headers", ()))
        origin = headers.get("origin", None)
        if origin is not None and not origin_allowed(origin, headers.get("host"), secure=scope.get("scheme") == "wss"):
            return False
        if not settings.MILLM_API_KEY or key_matches(presented_key(headers)):
            return True
        session = scope.get("session")
        return session is not None and await database_sync_to_async(session_has_key)(session)


def guarded_websockets(application):
    return SessionMiddlewareStack(WebSocketGuard(application))
