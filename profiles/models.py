"""Saved steering settings (miStudio-compatible profiles)."""

from __future__ import annotations

from django.db import models
from django.db.models import Q

from catalog.models import LanguageModel
from engine.rules import STEERING_DIRECTIONS, STEERING_MODES, STEERING_POSITIONS
from steering.models import SparseAutoencoder


def _choices(values: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(value, value.replace("_", " ")) for value in values]


class Profile(models.Model):
    # Addressable per request as "<model>:<profile name>" in the OpenAI `model` field.
    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    model = models.ForeignKey(LanguageModel, null=True, blank=True, on_delete=models.SET_NULL, related_name="profiles")
    sae = models.ForeignKey(SparseAutoencoder, null=True, blank=True, on_delete=models.SET_NULL, related_name="profiles")
    mode = models.CharField(max_length=16, choices=_choices(STEERING_MODES), default="additive")
    positions = models.CharField(max_length=16, choices=_choices(STEERING_POSITIONS), default="all")
    layers = models.JSONField(default=list, blank=True)  # additive: also steer at these decoder layers
    direction = models.CharField(max_length=16, choices=_choices(STEERING_DIRECTIONS), default="decoder")
    # Steer only the first N generated tokens (null: all) / stop once a steered concept token is written.
    max_steered_tokens = models.PositiveIntegerField(null=True, blank=True)
    until_concept = models.BooleanField(default=False)
    # Stop generating at the first token where one of these holds: [{"sae", "index", "above"|"below"}].
    abort_when = models.JSONField(default=list, blank=True)
    # Stored steering vectors added too: [{"name": SteeringVector name, "strength": float}].
    vectors = models.JSONField(default=list, blank=True)
    is_active = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["is_active"], condition=Q(is_active=True), name="profile_single_active"),
        ]

    def __str__(self) -> str:
        return self.name


class ProfileFeature(models.Model):
    profile = models.ForeignKey(Profile, on_delete=models.CASCADE, related_name="features")
    # The SAE the feature belongs to; blank: the first attached SAE (single-SAE profiles and files).
    sae = models.CharField(max_length=120, blank=True, default="")
    index = models.PositiveIntegerField()
    strength = models.FloatField()
    label = models.CharField(max_length=300, blank=True)
    # Optional condition on another feature at the same token: {"sae", "index", "above"|"below"}.
    when = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["profile", "sae", "index"]
        constraints = [
            models.UniqueConstraint(fields=["profile", "sae", "index"], name="profile_feature_unique"),
            models.CheckConstraint(condition=Q(index__gte=0), name="profile_feature_index_nonnegative"),
            # NaN compares false both ways, so this also keeps NaN out on PostgreSQL.
            models.CheckConstraint(condition=Q(strength__gte=-10000.0) & Q(strength__lte=10000.0),
                                   name="profile_feature_strength_bounded"),
        ]

    def __str__(self) -> str:
        return f"{self.profile.name}#{self.index} x{self.strength}"


class VectorFormat(models.TextChoices):
    GGUF = "gguf", "llama.cpp control-vector GGUF"
    REPENG = "repeng", "repeng ControlVector (JSON)"
    INLINE = "inline", "given as numbers through the API"
    STEERING = "steering", "exported from SAE steering"


class SteeringVector(models.Model):
    """A stored steering vector: a direction per decoder layer, added to that layer's output (times a strength).

    The directions are kept as the llama.cpp control-vector GGUF itself (engine/control_vector_files.py),
    small enough for the database (d_model x layers x 4 bytes) and exported as is."""

    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    model = models.ForeignKey(LanguageModel, null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="steering_vectors", help_text="The model whose residual stream it fits")
    model_hint = models.CharField(max_length=100, blank=True, help_text="The file's controlvector.model_hint")
    d_model = models.PositiveIntegerField(help_text="Width of each direction (the model's hidden size)")
    layers = models.JSONField(default=list, help_text="Decoder layers (0-based) the vector has a direction at")
    data = models.BinaryField(help_text="The directions as a control-vector GGUF")
    source_format = models.CharField(max_length=16, choices=VectorFormat.choices, default=VectorFormat.GGUF)
    # Set: the active steering adds this vector at this strength to every request that brings no steering.
    active_strength = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=Q(d_model__gt=0), name="steering_vector_width_positive"),
            models.CheckConstraint(condition=Q(active_strength__gte=-10000.0) & Q(active_strength__lte=10000.0)
                                   | Q(active_strength__isnull=True), name="steering_vector_strength_bounded"),
        ]

    def __str__(self) -> str:
        return self.name
