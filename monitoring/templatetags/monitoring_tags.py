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


@register.filter
def newest_first(frames: list[dict]) -> list[dict]:
    """An event's frames, newest token first (the log grows at the top); the frames of one token (one per SAE
    while several are attached) keep their attach order, so the default SAE's stays above the others'."""
    tokens: list[list[dict]] = []
    for frame in frames or []:
        last = tokens[-1][0] if tokens else None
        if last is not None and (last.get("request_id"), last.get("position")) == (frame.get("request_id"),
                                                                                   frame.get("position")):
            tokens[-1].append(frame)
        else:
            tokens.append([frame])
    return [frame for token in reversed(tokens) for frame in token]
