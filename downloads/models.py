"""Downloads from the HuggingFace hub: one row per fetch, with progress and its outcome."""

from __future__ import annotations

from django.db import models
from django.db.models import Q

from catalog.models import LanguageModel, Quantization


class DownloadKind(models.TextChoices):
    MODEL = "model"
    SAE = "sae"


class DownloadStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Download(models.Model):
    """One fetch of a model or an SAE from the HuggingFace hub, and the catalog row it fills.

    The row outlives a failed or cancelled transfer (with its error) even though the catalog entry it
    was filling is removed: the history says what happened, the catalog only lists usable entries.
    """

    kind = models.CharField(max_length=8, choices=DownloadKind.choices)
    name = models.SlugField(max_length=120, help_text="Catalog name of the model/SAE being filled")
    repo_id = models.CharField(max_length=200, blank=True, help_text="Hub repo id (resolved from the release for SAELens)")
    revision = models.CharField(max_length=100, default="main")
    commit = models.CharField(max_length=64, blank=True, help_text="Commit the revision resolved to")
    path = models.CharField(max_length=300, blank=True, help_text="SAE folder inside the repo")
    release = models.CharField(max_length=200, blank=True, help_text="SAELens release (resolved to repo_id + path)")
    sae_id = models.CharField(max_length=200, blank=True)
    quantization = models.CharField(max_length=8, choices=Quantization.choices, default=Quantization.NONE)
    trust_remote_code = models.BooleanField(default=False)
    local_dir = models.CharField(max_length=500, blank=True)
    status = models.CharField(max_length=16, choices=DownloadStatus.choices, default=DownloadStatus.QUEUED)
    bytes_done = models.BigIntegerField(default=0)
    bytes_total = models.BigIntegerField(null=True, blank=True)
    current_file = models.CharField(max_length=300, blank=True)
    error_code = models.CharField(max_length=40, blank=True)
    error_message = models.TextField(blank=True)
    error_details = models.JSONField(default=dict, blank=True)
    cancel_requested = models.BooleanField(default=False)
    task_id = models.CharField(max_length=64, blank=True)
    catalog_model = models.ForeignKey(LanguageModel, null=True, blank=True, on_delete=models.SET_NULL,
                                      related_name="downloads",
                                      help_text="Model row filled (kind=model) or read by the SAE (kind=sae)")
    catalog_sae = models.ForeignKey("steering.SparseAutoencoder", null=True, blank=True, on_delete=models.SET_NULL,
                                    related_name="downloads", help_text="SAE row registered when done (kind=sae)")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(kind__in=DownloadKind.values), name="download_kind_valid"),
            models.CheckConstraint(condition=Q(status__in=DownloadStatus.values), name="download_status_valid"),
            models.CheckConstraint(condition=Q(bytes_done__gte=0), name="download_bytes_done_nonnegative"),
        ]
        indexes = [models.Index(fields=["status"])]

    def __str__(self) -> str:
        return f"{self.kind} {self.name} ({self.status})"
