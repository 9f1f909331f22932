from django.apps import AppConfig


class InferenceConfig(AppConfig):
    """The inference process (`run_inference`) and its client; holds no tables."""

    name = "inference"
    verbose_name = "Inference process"
