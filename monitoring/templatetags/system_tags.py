"""Filters for the History and System pages: sparkline points, light names, pretty JSON."""

from __future__ import annotations

import json

from django import template
from django.core.serializers.json import DjangoJSONEncoder

register = template.Library()

CHECK_LABELS = {"latency_p99_ms": "Latency p99", "error_rate": "Errors", "memory_percent": "Memory",
                "inference": "Inference"}


@register.filter
def sparkline_points(values: list[float] | None, size: str = "240x48") -> str:
    """SVG polyline points for a series, scaled to its own peak (a flat zero line when idle)."""
    width, height = (float(n) for n in size.split("x"))
    series = list(values or [])
    if not series:
        return ""
    peak = max(max(series), 1e-9)
    step = width / max(1, len(series) - 1)
    return " ".join(f"{i * step:.1f},{height - 2 - (height - 4) * (v / peak):.1f}" for i, v in enumerate(series))


@register.filter
def check_label(kind: str) -> str:
    return CHECK_LABELS.get(kind, kind)


@register.filter
def pretty_json(value) -> str:
    return json.dumps(value, indent=2, sort_keys=True, cls=DjangoJSONEncoder)


@register.filter
def as_percent(fraction: float | None) -> str:
    return "—" if fraction is None else f"{100 * fraction:.1f}%"
