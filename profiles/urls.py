from django.urls import path

from profiles import views

app_name = "profiles"
urlpatterns = [
    path("", views.profiles_page, name="profiles"),
    path("import", views.profile_import_action, name="import"),
    path("<slug:name>/activate", views.profile_activate_action, name="activate"),
    path("<slug:name>/deactivate", views.profile_deactivate_action, name="deactivate"),
]
