from django.urls import path

from profiles import views

app_name = "profiles"
urlpatterns = [
    path("", views.profiles_page, name="profiles"),
    path("import", views.profile_import_action, name="import"),
    path("from-active", views.profile_from_active_action, name="from-active"),
    path("<slug:name>/activate", views.profile_activate_action, name="activate"),
    path("<slug:name>/deactivate", views.profile_deactivate_action, name="deactivate"),
    path("<slug:name>/edit", views.profile_edit_action, name="edit"),
    path("<slug:name>/delete", views.profile_delete_action, name="delete"),
    path("<slug:name>/export", views.profile_export_download, name="export"),
]
