from django.urls import path

from monitoring.consumers import MonitorConsumer, ProgressConsumer, SystemConsumer

websocket_urlpatterns = [
    path("ws/monitor/", MonitorConsumer.as_asgi()),
    path("ws/system/", SystemConsumer.as_asgi()),
    path("ws/progress/", ProgressConsumer.as_asgi()),
]
