"""Page helpers for features and steering: highlighted search matches, the nav's steering badge."""

from __future__ import annotations

import re

from django import template
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from steering.models import SteeringState

register = template.Library()


@register.filter
def highlight(text: str, query: str) -> SafeString:
    """The text, escaped, with each case-insensitive match of the query in <mark>."""
    text, query = str(text or ""), str(query or "").strip()
    if not query:
        return escape(text)
    parts = re.split(f"({re.escape(query)})", text, flags=re.IGNORECASE)
    # split with one group alternates: outside, match, outside, ...
    return mark_safe("".join(f"<mark>{escape(p)}</mark>" if i % 2 else escape(p) for i, p in enumerate(parts)))  # noqa: S308 - every part is escaped


@register.inclusion_tag("steering/_nav_badge.html")
def steering_badge(oob: bool = False) -> dict:
    """What every request gets steered with, for the nav (one query per page)."""
    state = SteeringState.objects.filter(pk=1).only("features", "source_profile", "units").first()
    return {"state": state if state and state.features else None, "oob": oob}
