"""Every HTTP route, one hop from here: pages per app, the management API, admin."""

from django.contrib import admin
from django.urls import include, path

from millm_site import views as site_views
from millm_site.api import api
from monitoring.views import metrics_endpoint
from serving.api import v1

urlpatterns = [
    path("", include("monitoring.urls")),
    path("models/", include("catalog.urls")),
    path("", include("steering.urls")),
    path("profiles/", include("profiles.urls")),
    path("v1/", v1.urls),
    path("api/", api.urls),
    path("metrics", metrics_endpoint, name="metrics"),  # Prometheus; outside /api, so no API key
    path("admin/", admin.site.urls),
    path("login/", site_views.login_page, name="login"),  # MILLM_API_KEY for the pages
    path("logout/", site_views.logout_action, name="logout"),
]
