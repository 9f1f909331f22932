"""Catalog rows for tests, written once: each factory takes the fields a test cares about and fills the rest."""

from __future__ import annotations

from typing import Any

from catalog.models import LanguageModel
from profiles.models import Profile, ProfileFeature
from steering.models import FeatureLabel, LabelSource, SparseAutoencoder


def language_model(name: str = "tiny", **fields: Any) -> LanguageModel:
    defaults: dict[str, Any] = {"repo_id": f"org/{name}", "hidden_size": 8, "num_layers": 4}
    return LanguageModel.objects.create(name=name, **{**defaults, **fields})


def sparse_autoencoder(model: LanguageModel | None = None, name: str = "tiny-sae", *, layer: int = 1,
                       **fields: Any) -> SparseAutoencoder:
    model = model or language_model()
    defaults: dict[str, Any] = {"repo_id": f"org/{name}", "hook_name": f"blocks.{layer}.hook_resid_post",
                                "d_in": model.hidden_size or 8, "d_sae": 64}
    return SparseAutoencoder.objects.create(name=name, model=model, layer=layer, **{**defaults, **fields})


def feature_labels(sae: SparseAutoencoder, labels: dict[int, str], *,
                   source: str = LabelSource.AUTO) -> list[FeatureLabel]:
    return [FeatureLabel.objects.create(sae=sae, index=index, label=label, source=source)
            for index, label in labels.items()]


def profile(name: str = "loud", *, features: dict[int, float] | None = None, **fields: Any) -> Profile:
    created = Profile.objects.create(name=name, **fields)
    for index, strength in (features or {}).items():
        ProfileFeature.objects.create(profile=created, index=index, strength=strength)
    return created
