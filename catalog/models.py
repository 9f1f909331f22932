"""The language-model catalog: what is on disk, what is loaded, and what should be loaded."""

from __future__ import annotations

from django.db import models
from django.db.models import Q


class ModelStatus(models.TextChoices):
    DOWNLOADING = "downloading"
    READY = "ready"
    LOADING = "loading"
    LOADED = "loaded"
    ERROR = "error"


class Dtype(models.TextChoices):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class Quantization(models.TextChoices):
    NONE = "none"
    Q8 = "q8"
    Q4 = "q4"


class LanguageModel(models.Model):
    # The id clients use in /v1 requests ("model": "smollm2-135m-instruct").
    name = models.SlugField(max_length=100, unique=True)
    repo_id = models.CharField(max_length=200, help_text="HuggingFace repo id, or a local identity")
    revision = models.CharField(max_length=100, default="main")
    local_path = models.CharField(max_length=500, blank=True)
    gguf_file = models.CharField(max_length=200, blank=True)
    parameter_count = models.BigIntegerField(null=True, blank=True)
    hidden_size = models.PositiveIntegerField(null=True, blank=True)
    num_layers = models.PositiveIntegerField(null=True, blank=True)
    context_length = models.PositiveIntegerField(null=True, blank=True)
    dtype = models.CharField(max_length=16, choices=Dtype.choices, default=Dtype.FLOAT32)
    quantization = models.CharField(max_length=8, choices=Quantization.choices, default=Quantization.NONE)
    memory_estimate_bytes = models.BigIntegerField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=ModelStatus.choices, default=ModelStatus.READY)
    status_message = models.TextField(blank=True)
    # Desired state: the inference process loads this model again after a restart.
    desired_loaded = models.BooleanField(default=False)
    is_demo = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=Q(parameter_count__isnull=True) | Q(parameter_count__gt=0),
                                   name="model_parameter_count_positive"),
            models.CheckConstraint(condition=Q(memory_estimate_bytes__isnull=True) | Q(memory_estimate_bytes__gte=0),
                                   name="model_memory_estimate_nonnegative"),
            models.CheckConstraint(condition=Q(status__in=ModelStatus.values), name="model_status_valid"),
            # At most one model is meant to be loaded: the inference process serves one at a time.
            models.UniqueConstraint(fields=["desired_loaded"], condition=Q(desired_loaded=True),
                                    name="model_single_desired_loaded"),
        ]

    def __str__(self) -> str:
        return self.name
