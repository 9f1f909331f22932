"""ASGI entry point for daphne: HTTP goes to Django, WebSockets to the Channels consumers."""

import os
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "millm_site.settings")

from millm_site.env import SettingError  # noqa: E402

try:
    from django.core.asgi import get_asgi_application

    django_asgi_app = get_asgi_application()
except SettingError as exc:
    sys.stderr.write(f"miLLM configuration error: {exc}\n")
    sys.exit(2)

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from millm_site import shutdown  # noqa: E402
from millm_site.routing import guarded_websockets, websocket_urlpatterns  # noqa: E402

# On SIGTERM/SIGINT, streams in flight end with an error event and [DONE] instead of a bare cut.
shutdown.install_daphne_trigger()
http_app = shutdown.graceful_http(ASGIStaticFilesHandler(django_asgi_app) if settings.SERVE_STATIC
                                  else django_asgi_app)

application = ProtocolTypeRouter(
    {
        "http": http_app,
        "websocket": guarded_websockets(URLRouter(websocket_urlpatterns)),
    }
)
