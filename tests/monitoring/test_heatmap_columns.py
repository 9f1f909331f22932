"""The history heatmap on a chat: the chat template's newlines do not take the columns, and the generated
tokens' features come first so the visible columns show the answer (issue 12, seen on the demo tier)."""

from monitoring.heatmap import heatmap

CHAT = [
    {"position": 0, "token": "<|im_start|>", "type": "prompt", "features": {"1": 4000.0}},
    {"position": 1, "token": "\n", "type": "prompt", "features": {"983": 45.0, "2209": 42.0}},
    {"position": 2, "token": "Tell", "type": "prompt", "features": {"5": 20.0}},
    {"position": 3, "token": "My", "type": "generated", "features": {"1270": 40.0, "983": 3.0}},
    {"position": 4, "token": " weekend", "type": "generated", "features": {"8": 12.0}},
]


def test_whitespace_tokens_are_left_out_of_the_columns_and_scale_but_keep_their_row():
    table = heatmap(CHAT, labels={}, max_columns=3)
    assert 2209 not in [c.index for c in table.columns]
    assert [row.token for row in table.rows] == ["\n", "Tell", "My", " weekend"]
    assert table.rows[2].cells[0] == (40.0, 1.0)  # the scale is the text's peak, not the newline's 45


def test_the_generated_tokens_features_are_the_first_columns():
    table = heatmap(CHAT, labels={}, max_columns=4)
    assert [c.index for c in table.columns][:2] == [1270, 8]
    assert all(any(value is not None for value, _ in row.cells) for row in table.rows if row.kind == "generated")
