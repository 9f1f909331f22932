"""Numbers the Models and SAEs pages show in the units people say out loud (135M parameters, 1.2 GB)."""

from __future__ import annotations

from django import template

register = template.Library()


@register.filter
def human_count(value: int | float | None) -> str:
    """135_000_000 -> "135M", 1_710_000_000 -> "1.7B", 16384 -> "16.4K"; None -> "—"."""
    if value is None or value == "":
        return "—"
    number = float(value)
    for limit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(number) >= limit:
            scaled = number / limit
            return f"{scaled:.0f}{suffix}" if scaled >= 100 else f"{scaled:.3g}{suffix}"
    return f"{number:.0f}"


@register.filter
def human_bytes(value: int | float | None) -> str:
    """Decimal units, as the hub and disk tools print them: 538_000_000 -> "538 MB"."""
    if value is None or value == "":
        return "—"
    number = float(value)
    for limit, suffix in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if number >= limit:
            scaled = number / limit
            return f"{scaled:.0f} {suffix}" if scaled >= 100 else f"{scaled:.3g} {suffix}"
    return f"{number:.0f} B"


@register.filter
def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * float(value):.1f}%"
