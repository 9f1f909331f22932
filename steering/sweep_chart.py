"""The sweep's small chart, computed here and drawn as inline SVG by templates/steering/_sweep.html:
concept score and fluency against strength, the recommended point marked. Strengths sit at even steps
(the auto grid is geometric, and 0 is always there), each line scaled to its own range."""

from __future__ import annotations

from typing import Any

WIDTH, HEIGHT, PAD = 420, 180, 30


def _scaled(values: list[float | None]) -> list[float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return [None] * len(values)
    low, high = min(known), max(known)
    span = high - low or 1.0
    return [None if v is None else (v - low) / span for v in values]


def sweep_chart(result: dict[str, Any]) -> dict[str, Any]:
    points = result["points"]
    step = (WIDTH - 2 * PAD) / max(1, len(points) - 1)
    xs = [round(PAD + i * step, 1) for i in range(len(points))]

    def y(fraction: float | None) -> float | None:
        return None if fraction is None else round(HEIGHT - PAD - fraction * (HEIGHT - 2 * PAD), 1)

    ys = {key: [y(s) for s in _scaled([p[key] for p in points])] for key in ("concept_score", "fluency")}
    dots = {key: [(x, yy) for x, yy in zip(xs, values, strict=True) if yy is not None] for key, values in ys.items()}
    recommended = result.get("recommended_strength")
    marker = next(({"x": x, "y": yy, "strength": recommended}
                   for x, yy, p in zip(xs, ys["concept_score"], points, strict=True)
                   if recommended is not None and p["strength"] == recommended and yy is not None), None)
    return {"width": WIDTH, "height": HEIGHT, "pad": PAD, "bottom": HEIGHT - PAD, "right": WIDTH - PAD,
            "concept": " ".join(f"{x},{yy}" for x, yy in dots["concept_score"]),
            "fluency": " ".join(f"{x},{yy}" for x, yy in dots["fluency"]),
            "concept_dots": dots["concept_score"], "fluency_dots": dots["fluency"],
            "ticks": [{"x": x, "label": f"{p['strength']:g}"} for x, p in zip(xs, points, strict=True)],
            "marker": marker}
