"""Reads of the SAE catalog and feature labels."""

from __future__ import annotations

import re
from dataclasses import dataclass

from django.db.models import Count, Q, QuerySet

from millm_site.errors import SaeNotFound
from steering.models import FeatureLabel, SparseAutoencoder


def sae_list() -> QuerySet[SparseAutoencoder]:
    return SparseAutoencoder.objects.select_related("model").annotate(label_count=Count("labels"))


def feature_search(*, sae: SparseAutoencoder, query: str = "", limit: int = 50) -> list[FeatureLabel]:
    """Labels of one SAE matching a text or an index, best first (see `feature_rank`)."""
    return feature_search_page(sae=sae, query=query, page=1, page_size=limit).items


@dataclass(frozen=True)
class FeaturePage:
    items: list[FeatureLabel]
    total: int
    page: int
    pages: int
    page_size: int
    query: str

    @property
    def first_row(self) -> int:
        return (self.page - 1) * self.page_size + 1 if self.total else 0

    @property
    def last_row(self) -> int:
        return min(self.page * self.page_size, self.total)


def feature_rank(label: FeatureLabel, query: str) -> tuple[int, int, int]:
    """Lower is better: the index itself, then label matches before description matches, whole words
    before substrings (so "sea" finds the sea feature before "search"); ties go to the shorter label."""
    if query.isdigit() and label.index == int(query):
        return (0, 0, label.index)
    word = re.compile(rf"(?<![\w]){re.escape(query)}(?![\w])", re.IGNORECASE)
    text = query.lower()
    if word.search(label.label):
        tier = 1
    elif text in label.label.lower():
        tier = 2
    elif word.search(label.description):
        tier = 3
    else:
        tier = 4
    return (tier, len(label.label), label.index)


def feature_search_page(*, sae: SparseAutoencoder, query: str = "", page: int = 1,
                        page_size: int = 50) -> FeaturePage:
    """One page of an SAE's labels for a query, ranked; an empty query lists them by index."""
    query = query.strip()
    # "sae" too: the related manager sets each row's SAE, which would re-read a deferred sae_id row by row.
    labels = sae.labels.only("sae", "index", "label", "description", "max_activation", "source")
    if not query:
        total = labels.count()
        pages = max(1, -(-total // page_size))
        page = min(max(page, 1), pages)
        items = list(labels.order_by("index")[(page - 1) * page_size: page * page_size])
        return FeaturePage(items=items, total=total, page=page, pages=pages, page_size=page_size, query=query)
    match = Q(label__icontains=query) | Q(description__icontains=query)
    if query.isdigit():
        match |= Q(index=int(query))
    # Ranking needs the text of every match; an SAE has at most tens of thousands of labels.
    ranked = sorted(labels.filter(match), key=lambda label: feature_rank(label, query))
    total = len(ranked)
    pages = max(1, -(-total // page_size))
    page = min(max(page, 1), pages)
    items = ranked[(page - 1) * page_size: page * page_size]
    return FeaturePage(items=items, total=total, page=page, pages=pages, page_size=page_size, query=query)


def sae_get(*, name: str) -> SparseAutoencoder:
    try:
        return SparseAutoencoder.objects.select_related("model").get(name=name)
    except SparseAutoencoder.DoesNotExist:
        raise SaeNotFound(f"No SAE named {name!r}", details={"name": name}) from None
