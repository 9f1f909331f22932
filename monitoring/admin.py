from django.contrib import admin

from monitoring.models import RequestRecord


@admin.register(RequestRecord)
class RequestRecordAdmin(admin.ModelAdmin):
    list_display = ("request_id", "endpoint", "model_name", "profile_name", "status",
                    "prompt_tokens", "completion_tokens", "latency_ms", "created_at")
    list_filter = ("status", "endpoint", "model_name")
    search_fields = ("request_id", "prompt", "output")
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in RequestRecord._meta.fields]
