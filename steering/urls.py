from django.urls import path

from steering import views

app_name = "steering"
urlpatterns = [
    path("saes/", views.saes_page, name="saes"),
    path("steering/", views.steering_page, name="steering"),
]
