from django.urls import path

from steering import sweep_views, views

app_name = "steering"
urlpatterns = [
    path("saes/", views.saes_page, name="saes"),
    path("saes/download", views.sae_download_action, name="download"),
    path("saes/<slug:name>/attach", views.sae_attach_action, name="attach"),
    path("saes/<slug:name>/detach", views.sae_detach_action, name="detach"),
    path("steering/", views.steering_page, name="steering"),
    path("steering/slider/<int:index>", views.steering_slider, name="slider"),
    path("steering/apply", views.steering_apply_action, name="apply"),
    path("steering/compare", views.steering_compare_action, name="compare"),
    path("steering/sweep", sweep_views.sweep_action, name="sweep"),
    path("steering/sweeps/<uuid:sweep_id>", sweep_views.sweep_fragment, name="sweep-status"),
    path("steering/text-features", views.text_features_action, name="text-features"),
    path("steering/save-profile", views.steering_save_profile_action, name="save-profile"),
    path("saes/<slug:name>/features/<int:index>/", views.feature_page, name="feature"),
    path("saes/<slug:name>/features/<int:index>/label", views.feature_label_action, name="feature-label"),
    path("saes/<slug:name>/features/<int:index>/contexts", views.feature_contexts_fragment, name="feature-contexts"),
    path("saes/<slug:name>/features/<int:index>/contexts/build", views.feature_contexts_action,
         name="feature-contexts-build"),
    path("saes/<slug:name>/features/<int:index>/logit-lens", views.feature_logit_lens_fragment, name="feature-logit-lens"),
    path("saes/<slug:name>/features/<int:index>/live-stats", views.feature_live_stats_fragment, name="feature-live-stats"),
]
