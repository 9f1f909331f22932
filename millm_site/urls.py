"""Every HTTP route, one hop from here: pages per app, the management API, admin."""

from django.contrib import admin
from django.urls import include, path, re_path

from millm_site import views as site_views
from millm_site.api import api
from millm_site.api_fallbacks import API, V1, json_method_errors, not_found_view
from monitoring.views import metrics_endpoint
from serving.api import v1

urlpatterns = [
    path("", include("monitoring.urls")),
    path("models/", include("catalog.urls")),
    path("", include("steering.urls")),
    path("profiles/", include("profiles.urls")),
    path("v1/", json_method_errors(v1.urls, V1)),
    re_path(r"^v1/", not_found_view(V1)),  # after every /v1 route: an unknown path is JSON too
    path("api/", json_method_errors(api.urls, API)),
    re_path(r"^api/", not_found_view(API)),
    path("metrics", metrics_endpoint, name="metrics"),  # Prometheus; outside /api, so no API key
    path("admin/", admin.site.urls),
    path("login/", site_views.login_page, name="login"),  # MILLM_API_KEY for the pages
    path("logout/", site_views.logout_action, name="logout"),
]
