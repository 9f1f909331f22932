"""Writes to steering profiles."""

from __future__ import annotations

from django.db import transaction

from profiles.models import Profile


@transaction.atomic
def profile_activate(*, profile: Profile) -> Profile:
    Profile.objects.filter(is_active=True).exclude(pk=profile.pk).update(is_active=False)
    if not profile.is_active:
        profile.is_active = True
        profile.save(update_fields=["is_active", "updated_at"])
    return profile


def profile_deactivate(*, profile: Profile) -> Profile:
    if profile.is_active:
        profile.is_active = False
        profile.save(update_fields=["is_active", "updated_at"])
    return profile
