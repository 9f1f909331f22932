"""Reads of the SAE catalog and feature labels."""

from __future__ import annotations

from django.db.models import Count, Q, QuerySet

from millm_site.errors import SaeNotFound
from steering.models import FeatureLabel, SparseAutoencoder


def sae_list() -> QuerySet[SparseAutoencoder]:
    return SparseAutoencoder.objects.select_related("model").annotate(label_count=Count("labels"))


def feature_search(*, sae: SparseAutoencoder, query: str = "", limit: int = 50) -> QuerySet[FeatureLabel]:
    """Labels of one SAE matching a text (label/description) or an exact feature index."""
    labels = sae.labels.all()
    query = query.strip()
    if query:
        match = Q(label__icontains=query) | Q(description__icontains=query)
        if query.isdigit():
            match |= Q(index=int(query))
        labels = labels.filter(match)
    return labels.order_by("index")[:limit]


def sae_get(*, name: str) -> SparseAutoencoder:
    try:
        return SparseAutoencoder.objects.select_related("model").get(name=name)
    except SparseAutoencoder.DoesNotExist:
        raise SaeNotFound(f"No SAE named {name!r}", details={"name": name}) from None
