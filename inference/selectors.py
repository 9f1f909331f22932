"""Reads of the language-model catalog."""

from __future__ import annotations

from django.db.models import QuerySet

from inference.models import LanguageModel
from millm_site.errors import ModelNotFound


def model_list() -> QuerySet[LanguageModel]:
    return LanguageModel.objects.all()


def model_get(*, name: str) -> LanguageModel:
    try:
        return LanguageModel.objects.get(name=name)
    except LanguageModel.DoesNotExist:
        raise ModelNotFound(f"No model named {name!r}", details={"name": name}) from None


def model_desired_loaded() -> LanguageModel | None:
    return LanguageModel.objects.filter(desired_loaded=True).first()
