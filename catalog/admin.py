from django.contrib import admin, messages

from catalog import services
from catalog.models import LanguageModel


@admin.register(LanguageModel)
class LanguageModelAdmin(admin.ModelAdmin):
    list_display = ("name", "repo_id", "status", "dtype", "quantization", "parameter_count",
                    "memory_estimate_bytes", "desired_loaded", "is_demo", "updated_at")
    list_filter = ("status", "dtype", "quantization", "is_demo", "desired_loaded")
    search_fields = ("name", "repo_id", "local_path")
    readonly_fields = ("created_at", "updated_at")
    actions = ["verify_files"]

    @admin.action(description="Verify local files (marks missing ones as error)")
    def verify_files(self, request, queryset):
        results = [services.model_verify_files(model=m) for m in queryset]
        broken = sum(1 for ok in results if not ok)
        level = messages.WARNING if broken else messages.SUCCESS
        self.message_user(request, f"{len(results) - broken} model(s) present, {broken} missing.", level)
