"""The SAE catalog and the labels of their features."""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q

from catalog.models import LanguageModel


class SaeStatus(models.TextChoices):
    DOWNLOADING = "downloading"
    READY = "ready"
    ATTACHED = "attached"
    ERROR = "error"


class SaeArchitecture(models.TextChoices):
    STANDARD = "standard"
    JUMPRELU = "jumprelu"
    TOPK = "topk"


class SparseAutoencoder(models.Model):
    name = models.SlugField(max_length=120, unique=True)
    model = models.ForeignKey(LanguageModel, on_delete=models.CASCADE, related_name="saes",
                              help_text="The language model whose residual stream this SAE reads")
    repo_id = models.CharField(max_length=200, help_text="HF repo id or SAELens release")
    sae_id = models.CharField(max_length=200, blank=True, help_text="SAELens sae id / path inside the repo")
    layer = models.PositiveIntegerField()
    hook_name = models.CharField(max_length=120)
    d_in = models.PositiveIntegerField()
    d_sae = models.PositiveIntegerField()
    architecture = models.CharField(max_length=16, choices=SaeArchitecture.choices, default=SaeArchitecture.STANDARD)
    local_path = models.CharField(max_length=500, blank=True)
    residual_norm = models.FloatField(null=True, blank=True,
                                      help_text="Median L2 norm of the hooked residual: the unit of relative strengths")
    status = models.CharField(max_length=16, choices=SaeStatus.choices, default=SaeStatus.READY)
    status_message = models.TextField(blank=True)
    # Attached again after a restart (every SAE marked, several at once), in `attached_order`: the first
    # is the default SAE, the one a feature without `sae` addresses.
    desired_attached = models.BooleanField(default=False)
    attached_order = models.PositiveIntegerField(null=True, blank=True)
    is_demo = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "sparse autoencoder"
        constraints = [
            models.CheckConstraint(condition=Q(d_in__gt=0) & Q(d_sae__gt=0), name="sae_dims_positive"),
            models.CheckConstraint(condition=Q(status__in=SaeStatus.values), name="sae_status_valid"),
        ]

    def __str__(self) -> str:
        return self.name


class LabelSource(models.TextChoices):
    AUTO = "auto", "automatic (top activating tokens)"
    NEURONPEDIA = "neuronpedia", "Neuronpedia export"
    MANUAL = "manual", "edited by hand"
    BUILTIN = "builtin", "built with the demo assets"


class FeatureLabel(models.Model):
    sae = models.ForeignKey(SparseAutoencoder, on_delete=models.CASCADE, related_name="labels")
    index = models.PositiveIntegerField()
    label = models.CharField(max_length=300)
    description = models.TextField(blank=True)
    source = models.CharField(max_length=16, choices=LabelSource.choices, default=LabelSource.MANUAL)
    max_activation = models.FloatField(null=True, blank=True, help_text="Typical max activation, for relative strengths")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["sae", "index"]
        constraints = [
            models.UniqueConstraint(fields=["sae", "index"], name="feature_label_unique_per_sae"),
            models.CheckConstraint(condition=Q(index__gte=0), name="feature_label_index_nonnegative"),
        ]
        indexes = [models.Index(fields=["sae", "label"])]

    def __str__(self) -> str:
        return f"{self.sae.name}#{self.index}: {self.label}"




class SteeringState(models.Model):
    """The steering applied to every /v1 request (a singleton row, pk=1): restored after a restart.

    Activating a profile copies its features here (`source_profile` names it); `/api/steering`
    edits it directly. A request's own steering (inline or `<model>:<profile>`) overrides it.
    """

    sae = models.ForeignKey(SparseAutoencoder, null=True, blank=True, on_delete=models.SET_NULL,
                            related_name="+")
    mode = models.CharField(max_length=16, default="additive")
    positions = models.CharField(max_length=16, default="all")
    units = models.CharField(max_length=16, default="raw")
    # [{"index": int, "strength": float, "sae": str (optional), "when": {...} (optional)}]
    features = models.JSONField(default=list, blank=True)
    # Stop generating at the first token where one holds: [{"sae", "index", "above"|"below"}]
    abort_when = models.JSONField(default=list, blank=True)
    layers = models.JSONField(default=list, blank=True)  # additive: also steer at these decoder layers
    direction = models.CharField(max_length=16, default="decoder")  # decoder row or concept direction
    # Steer only the first N generated tokens (null: all) / stop once a steered concept token is written.
    max_steered_tokens = models.PositiveIntegerField(null=True, blank=True)
    until_concept = models.BooleanField(default=False)
    source_profile = models.CharField(max_length=100, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "active steering"
        verbose_name_plural = "active steering"

    def __str__(self) -> str:
        return f"{len(self.features)} feature(s){' from ' + self.source_profile if self.source_profile else ''}"

    @classmethod
    def current(cls) -> SteeringState:
        state, _ = cls.objects.get_or_create(pk=1)
        return state


class SweepStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class SweepRun(models.Model):
    """One steering sweep (POST /api/steering/sweep): what was asked, how far it got, and its result.
    Small sweeps are answered inline and saved done; large ones run as a Celery job the client polls."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    sae = models.ForeignKey(SparseAutoencoder, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    request = models.JSONField(default=dict)  # the validated request: features, strengths, prompts, options
    status = models.CharField(max_length=16, choices=SweepStatus.choices, default=SweepStatus.QUEUED)
    progress = models.FloatField(default=0.0)  # 0..1
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"sweep {self.id} ({self.status})"
