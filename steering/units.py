"""Strength units: one number that means the same across SAEs.

- raw: the coefficient of the decoder row (additive) or the target activation (clamp).
- max_activation: multiples of the feature's typical max activation (FeatureLabel.max_activation).
- residual_norm: multiples of the hooked residual stream's median norm (SparseAutoencoder.residual_norm).
The engine only ever sees raw strengths: conversion happens here, once, when steering is set.
"""

from __future__ import annotations

from typing import Any

from millm_site.errors import ValidationFailed
from steering.models import SparseAutoencoder


def strengths_to_raw(*, sae: SparseAutoencoder, features: list[dict[str, Any]], units: str) -> list[dict[str, Any]]:
    if units == "raw" or not features:
        return features
    if units == "residual_norm":
        if not sae.residual_norm:
            raise ValidationFailed(f"units: SAE {sae.name} has no recorded residual norm; use raw strengths",
                                   details={"field": "units"})
        return [{**f, "strength": f["strength"] * sae.residual_norm} for f in features]
    if units == "max_activation":
        scale = dict(sae.labels.filter(index__in=[f["index"] for f in features], max_activation__isnull=False)
                     .values_list("index", "max_activation"))
        missing = [f["index"] for f in features if f["index"] not in scale]
        if missing:
            raise ValidationFailed(f"units: no recorded max activation for feature(s) {missing} of {sae.name}",
                                   details={"field": "units", "features": missing})
        return [{**f, "strength": f["strength"] * scale[f["index"]]} for f in features]
    raise ValidationFailed(f"units: unknown unit {units!r}", details={"field": "units"})
