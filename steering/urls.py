from django.urls import path

from steering import views

app_name = "steering"
urlpatterns = [
    path("saes/", views.saes_page, name="saes"),
    path("saes/<slug:name>/attach", views.sae_attach_action, name="attach"),
    path("saes/<slug:name>/detach", views.sae_detach_action, name="detach"),
    path("steering/", views.steering_page, name="steering"),
    path("steering/slider/<int:index>", views.steering_slider, name="slider"),
    path("steering/apply", views.steering_apply_action, name="apply"),
    path("steering/compare", views.steering_compare_action, name="compare"),
]
