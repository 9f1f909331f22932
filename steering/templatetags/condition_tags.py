"""Conditions and vectors of a steering as one line of text beside its features (Steering and Profiles pages)."""

from __future__ import annotations

from typing import Any

from django import template

from profiles.vector_services import active_vector_refs
from steering.conditions import condition_text

register = template.Library()


def _summary(features: list[tuple[int, dict | None]], abort_when: list[dict], vectors: list[dict]) -> str:
    parts = [f"#{index} when {condition_text(when)}" for index, when in features if when]
    parts += [f"abort when {condition_text(c)}" for c in abort_when]
    parts += [f"vector {v['name']} ×{v['strength']:g}" for v in vectors]
    return " · ".join(parts)


@register.filter
def steering_conditions(state: Any) -> str:
    """`#7 when #88 > 3 · abort when #101 > 5 · vector calm ×2` for the active steering."""
    # The saved SteeringState, or the dict steering_apply answers with (which lists its vectors itself).
    if isinstance(state, dict):
        fields, vectors = state, state.get("vectors")
    else:
        fields, vectors = vars(state), None
    features = [(f.get("index"), f.get("when")) for f in fields.get("features") or ()]
    return _summary(features, list(fields.get("abort_when") or ()),
                    vectors if vectors is not None else active_vector_refs())


@register.filter
def profile_conditions(profile: Any) -> str:
    features = [(f.index, f.when) for f in profile.features.all()]
    return _summary(features, list(profile.abort_when or ()), list(profile.vectors or ()))
