from django.urls import path

from inference import views

app_name = "inference"
urlpatterns = [
    path("", views.models_page, name="models"),
    path("<slug:name>/load", views.model_load_action, name="load"),
    path("<slug:name>/unload", views.model_unload_action, name="unload"),
]
