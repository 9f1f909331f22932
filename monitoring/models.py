"""Request history: what was asked, what came back, with which steering (filled by the serving path)."""

from __future__ import annotations

from django.db import models


class RequestStatus(models.TextChoices):
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    ERROR = "error"


class RequestRecord(models.Model):
    request_id = models.CharField(max_length=64, unique=True)
    endpoint = models.CharField(max_length=32)  # "chat.completions", "completions", "inspect"
    model_name = models.CharField(max_length=100)
    profile_name = models.CharField(max_length=100, blank=True)
    status = models.CharField(max_length=16, choices=RequestStatus.choices)
    prompt = models.TextField()
    output = models.TextField(blank=True)
    parameters = models.JSONField(default=dict)
    steering = models.JSONField(default=dict)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    latency_ms = models.FloatField(null=True, blank=True)
    ttft_ms = models.FloatField(null=True, blank=True)
    token_features = models.JSONField(default=list, blank=True)  # per token (and SAE): {token, position, features, sae?}
    error_message = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        # "-id" breaks ties between rows written in the same instant, so pages never overlap.
        ordering = ["-created_at", "-id"]
        # History pages filter by one column and sort newest first: (column, created_at) serves both,
        # and its prefix serves the plain filter; created_at alone serves the unfiltered page and retention.
        indexes = [
            models.Index(fields=["model_name", "-created_at"], name="history_model_recent"),
            models.Index(fields=["profile_name", "-created_at"], name="history_profile_recent"),
            models.Index(fields=["status", "-created_at"], name="history_status_recent"),
            models.Index(fields=["endpoint", "-created_at"], name="history_endpoint_recent"),
        ]

    def __str__(self) -> str:
        return f"{self.request_id} ({self.model_name}, {self.status})"


class CaptureSettings(models.Model):
    """The live-capture settings every inference process applies (one row): kept here so a restarted
    or added process monitors exactly as the others do."""

    enabled = models.BooleanField(default=True)
    top_k = models.PositiveSmallIntegerField(default=10)
    features = models.JSONField(default=list, blank=True)  # feature indices always reported
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.CheckConstraint(condition=models.Q(top_k__gte=1) & models.Q(top_k__lte=100),
                                              name="capture_top_k_range")]

    def __str__(self) -> str:
        return f"capture {'on' if self.enabled else 'off'}, top {self.top_k}"

    @classmethod
    def current(cls) -> CaptureSettings:
        settings, _ = cls.objects.get_or_create(pk=1)
        return settings
