"""The history heatmap: special tokens out of the columns and scale, generated tokens get columns, labels."""

from monitoring.heatmap import heatmap, user_prompt

FRAMES = [
    {"position": 0, "token": "<|im_start|>", "type": "prompt", "features": {"1": 4000.0, "2": 2700.0}},
    {"position": 1, "token": "Hello", "type": "prompt", "features": {"3": 8.0, "4": 6.0}},
    {"position": 2, "token": " cat", "type": "generated", "features": {"7": 2.0}},
]


def test_special_tokens_are_left_out_of_columns_and_scale_unless_asked():
    table = heatmap(FRAMES, labels={7: "' cat'"}, max_columns=2)
    assert [c.index for c in table.columns] == [7, 3]  # the generated token's feature keeps a column, first
    assert [row.token for row in table.rows] == ["Hello", " cat"] and table.special_rows == 1
    assert table.columns[0].label == "' cat'"
    assert table.rows[0].cells[1] == (8.0, 1.0)  # the scale is the text's peak, not the BOS token's 4000
    shown = heatmap(FRAMES, labels={}, include_special=True, max_columns=2)
    assert shown.rows[0].token == "<|im_start|>" and shown.columns[1].index == 1


def test_per_column_scaling():
    table = heatmap(FRAMES, labels={}, per_column=True, max_columns=4)
    assert {c.index: cell for c, cell in zip(table.columns, table.rows[1].cells, strict=True)}[7] == (2.0, 1.0)


def test_user_prompt_drops_the_chat_templates_system_text():
    chatml = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n"
              "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert user_prompt(chatml) == "What is the capital of France?"
    assert user_prompt("plain completion prompt") == "plain completion prompt"
