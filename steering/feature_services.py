"""Writes to one feature's label from the feature page."""

from __future__ import annotations

from millm_site.errors import InvalidFeatureIndex, ValidationFailed
from steering.models import FeatureLabel, LabelSource, SparseAutoencoder

MAX_LABEL = 300


def feature_label_edit(*, sae: SparseAutoencoder, index: int, label: str, description: str) -> FeatureLabel:
    """Set a feature's label by hand: marked manual, so an automatic relabel or an import keeps it."""
    if not 0 <= index < sae.d_sae:
        raise InvalidFeatureIndex(f"index: {index} is outside 0..{sae.d_sae - 1} for SAE {sae.name}",
                                  details={"field": "index"})
    label = label.strip()
    if not label:
        raise ValidationFailed("label: must not be empty", details={"field": "label"})
    if len(label) > MAX_LABEL:
        raise ValidationFailed(f"label: at most {MAX_LABEL} characters", details={"field": "label"})
    row, _ = FeatureLabel.objects.update_or_create(
        sae=sae, index=index, defaults={"label": label, "description": description.strip(), "source": LabelSource.MANUAL})
    return row
