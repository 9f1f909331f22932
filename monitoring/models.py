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
    model_name = models.CharField(max_length=100, db_index=True)
    profile_name = models.CharField(max_length=100, blank=True, db_index=True)
    status = models.CharField(max_length=16, choices=RequestStatus.choices, db_index=True)
    prompt = models.TextField()
    output = models.TextField(blank=True)
    parameters = models.JSONField(default=dict)
    steering = models.JSONField(default=dict)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    latency_ms = models.FloatField(null=True, blank=True)
    ttft_ms = models.FloatField(null=True, blank=True)
    token_features = models.JSONField(default=list, blank=True)  # per token: {token, position, features}
    error_message = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.request_id} ({self.model_name}, {self.status})"
