""""Top features for this text" (issue 12): the ranking of an inspect's frames, and the page action's
refusals. The whole path runs in Chromium on the demo tier in tests/live/test_demo_workbench_browser.py."""

import pytest

from steering.text_features import text_top_features

FRAMES = [
    {"position": 0, "token": "\n", "type": "prompt", "features": {"1": 4000.0}},  # the attention sink
    {"position": 1, "token": "I", "type": "prompt", "features": {"2": 40.0, "9": 5.0}},
    {"position": 2, "token": " Paris", "type": "prompt", "features": {"2": 30.0, "9": 20.0, "4": 7.0}},
    {"position": 3, "token": "<|im_end|>", "type": "prompt", "features": {"5": 900.0}},
    {"position": 4, "token": " ", "type": "prompt", "features": {"6": 80.0}},
]
LABELS = {2: ("' be', ' as'", 60.0), 9: ("' Paris', ' France'", 24.0), 4: ("' the'", None)}


def test_ranked_by_the_share_of_each_features_own_max_leaving_out_the_sink_special_and_blank_tokens():
    found = text_top_features(FRAMES, labels=LABELS)
    assert [f.index for f in found] == [9, 2, 4]  # 20/24 before 40/60; no max activation: last
    paris = found[0]
    assert (paris.label, paris.peak, paris.token, paris.tokens_active) == ("' Paris', ' France'", 20.0, " Paris", 2)
    assert paris.relative == pytest.approx(20 / 24) and found[2].relative is None
    assert [f.index for f in text_top_features(FRAMES, labels=LABELS, limit=1)] == [9]


@pytest.mark.django_db
@pytest.mark.parametrize(("text", "message"), [("", "text: type a text"), ("x" * 4001, "at most 4000")])
def test_the_action_refuses_an_empty_or_long_text(client, text, message):
    for _ in range(2):
        response = client.post("/steering/text-features", {"text": text}, HTTP_HX_REQUEST="true")
        assert response["HX-Retarget"] == "#action-error" and message in response.content.decode()
    assert client.get("/steering/text-features").status_code == 405
