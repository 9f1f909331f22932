from channels.security.websocket import OriginValidator
from django.conf import settings
from django.urls import path

from monitoring.consumers import MonitorConsumer, ProgressConsumer, SystemConsumer

websocket_urlpatterns = [
    path("ws/monitor/", MonitorConsumer.as_asgi()),
    path("ws/system/", SystemConsumer.as_asgi()),
    path("ws/progress/", ProgressConsumer.as_asgi()),
]


class BrowserOriginValidator(OriginValidator):
    """Browsers always send Origin, so a foreign one is refused (cross-site WebSocket hijacking);
    programs such as `websockets` clients send none and are let through, like any HTTP client."""

    def __init__(self, application):
        super().__init__(application, settings.ALLOWED_HOSTS)

    def valid_origin(self, parsed_origin) -> bool:
        return parsed_origin is None or super().valid_origin(parsed_origin)
