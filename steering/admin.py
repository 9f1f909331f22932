from django.contrib import admin

from steering.models import FeatureLabel, LabelSource, SparseAutoencoder


class FeatureLabelInline(admin.TabularInline):
    model = FeatureLabel
    extra = 0
    fields = ("index", "label", "source", "max_activation")
    show_change_link = True
    max_num = 0  # thousands of rows: edit them on the FeatureLabel page, not inline
    can_delete = False


@admin.register(SparseAutoencoder)
class SparseAutoencoderAdmin(admin.ModelAdmin):
    list_display = ("name", "model", "layer", "d_in", "d_sae", "architecture", "status", "desired_attached", "is_demo")
    list_filter = ("status", "architecture", "is_demo", "model")
    search_fields = ("name", "repo_id", "sae_id", "hook_name")
    readonly_fields = ("created_at", "updated_at")


@admin.register(FeatureLabel)
class FeatureLabelAdmin(admin.ModelAdmin):
    list_display = ("sae", "index", "label", "source", "max_activation", "updated_at")
    list_display_links = ("index",)
    list_editable = ("label",)
    list_filter = ("source", "sae")
    search_fields = ("label", "description", "=index")
    list_per_page = 100
    actions = ["mark_manual"]

    @admin.action(description="Mark as edited by hand")
    def mark_manual(self, request, queryset):
        updated = queryset.update(source=LabelSource.MANUAL)
        self.message_user(request, f"{updated} label(s) marked as manual.")

    def save_model(self, request, obj, form, change):
        if change and "label" in form.changed_data:
            obj.source = LabelSource.MANUAL
        super().save_model(request, obj, form, change)
