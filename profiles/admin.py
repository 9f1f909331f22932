from django.contrib import admin

from profiles import services
from profiles.models import Profile, ProfileFeature, SteeringVector


class ProfileFeatureInline(admin.TabularInline):
    model = ProfileFeature
    extra = 1


@admin.register(Profile)
class ProfileAdmin(admin.ModelAdmin):
    list_display = ("name", "model", "sae", "mode", "positions", "is_active", "updated_at")
    list_filter = ("is_active", "mode", "positions", "model")
    search_fields = ("name", "description")
    inlines = [ProfileFeatureInline]
    actions = ["activate", "deactivate"]

    @admin.action(description="Activate (deactivates the others)")
    def activate(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one profile to activate.", level="error")
            return
        profile = services.profile_activate(profile=queryset.get())
        self.message_user(request, f"Activated {profile.name}.")

    @admin.action(description="Deactivate")
    def deactivate(self, request, queryset):
        for profile in queryset:
            services.profile_deactivate(profile=profile)
        self.message_user(request, f"{queryset.count()} profile(s) deactivated.")


@admin.register(SteeringVector)
class SteeringVectorAdmin(admin.ModelAdmin):
    list_display = ("name", "model", "d_model", "layers", "source_format", "active_strength", "created_at")
    list_filter = ("source_format", "model")
    search_fields = ("name", "description", "model_hint")
    # The directions are a GGUF blob: imported and exported through /api/vectors, not edited here.
    readonly_fields = ("model_hint", "d_model", "layers", "source_format", "created_at")
    exclude = ("data",)
