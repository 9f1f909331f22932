from django.templatetags.static import static
from django.urls import path
from django.views.generic import RedirectView

from monitoring import views

app_name = "monitoring"
urlpatterns = [
    path("", views.home_page, name="home"),
    path("monitor/", views.monitor_page, name="monitor"),
    path("monitor/configure", views.monitor_configure_action, name="monitor-configure"),
    path("history/", views.history_list_page, name="history"),
    path("history/export", views.history_export_download, name="history-export"),
    path("history/<str:request_id>/", views.history_detail_page, name="history-detail"),
    path("system/", views.system_page, name="system"),
    # Browsers and the admin ask for /favicon.ico whatever the page links.
    path("favicon.ico", RedirectView.as_view(url=static("favicon.svg"), permanent=True), name="favicon"),
]
