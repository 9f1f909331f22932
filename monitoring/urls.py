from django.urls import path

from monitoring import views

app_name = "monitoring"
urlpatterns = [
    path("", views.home_page, name="home"),
    path("monitor/", views.monitor_page, name="monitor"),
]
