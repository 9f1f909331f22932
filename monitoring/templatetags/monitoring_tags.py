from django import template

register = template.Library()


@register.filter
def top_features(frame: dict, count: int = 5) -> list[dict]:
    """The frame's strongest features as {index, value, label, percent} (percent of the strongest)."""
    ranked = sorted(frame.get("features", {}).items(), key=lambda kv: kv[1], reverse=True)[:count]
    peak = ranked[0][1] if ranked and ranked[0][1] > 0 else 1.0
    labels = frame.get("labels", {})
    return [{"index": index, "value": value, "label": labels.get(index, labels.get(str(index), "")),
             "percent": max(2, round(100 * value / peak))} for index, value in ranked]
