"""The Monitor's live fragment for frames of several SAEs: newest token on top, a token's frames in attach order
(the default SAE's first), each with its SAE's badge and `data-sae`; frames of one SAE render as before."""

from __future__ import annotations

import re

from django.template.loader import render_to_string


def frame(request_id: str, position: int, sae: str | None = None) -> dict:
    found = {"request_id": request_id, "position": position, "type": "prompt", "token": f"t{position}",
             "features": {"7": 1.0 + position}, "labels": {"7": "cat"}}
    return {**found, "sae": sae} if sae else found


def rendered_order(html: str) -> list[tuple[str, str, str | None]]:
    return [(request, position, sae or None) for request, position, sae in re.findall(
        r'<div class="frame frame-prompt" data-request="([^"]+)" data-position="(\d+)"(?: data-sae="([^"]+)")?>',
        html)]


def test_a_tokens_frames_keep_attach_order_under_the_newest_token():
    frames = [frame("a", 0, "late"), frame("a", 0, "early"), frame("b", 0, "late"), frame("b", 0, "early"),
              frame("a", 1, "late"), frame("a", 1, "early")]
    html = render_to_string("events/activation_update.html", {"payload": {"frames": frames}})
    assert rendered_order(html) == [("a", "1", "late"), ("a", "1", "early"), ("b", "0", "late"),
                                    ("b", "0", "early"), ("a", "0", "late"), ("a", "0", "early")]
    assert re.findall(r'class="badge sae-badge frame-sae"[^>]*>([^<]+)<', html) == ["late", "early"] * 3


def test_frames_of_one_sae_render_newest_first_without_a_badge():
    html = render_to_string("events/activation_update.html",
                            {"payload": {"frames": [frame("a", 0), frame("a", 1), frame("a", 2)]}})
    assert rendered_order(html) == [("a", "2", None), ("a", "1", None), ("a", "0", None)]
    assert "frame-sae" not in html and "data-sae" not in html
