from django.contrib import admin

from downloads.models import Download


@admin.register(Download)
class DownloadAdmin(admin.ModelAdmin):
    list_display = ("id", "kind", "repo_id", "revision", "status", "bytes_done", "bytes_total", "created_at")
    list_filter = ("kind", "status")
    search_fields = ("repo_id", "error_message")
    readonly_fields = [f.name for f in Download._meta.fields]

    def has_add_permission(self, request) -> bool:
        # Downloads are started through the API or the models page (which also queues the task);
        # a row added by hand would be a download that never runs.
        return False
