from django.urls import path

from catalog import views

app_name = "catalog"
urlpatterns = [
    path("", views.models_page, name="models"),
    path("download", views.model_download_action, name="download"),
    path("downloads/<int:download_id>/cancel", views.download_cancel_action, name="download-cancel"),
    path("<slug:name>/load", views.model_load_action, name="load"),
    path("<slug:name>/unload", views.model_unload_action, name="unload"),
]
