"""Per-feature strength calibration (engine/calibration.py, engine/calibration_sweep.py) against numbers
computed by hand: the batched, cache-sharing KL against one full forward pass per row with the delta added
by hand, the log-log inversion on known curves, and the sweep's choice rule."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.calibration import (
    CalibrationRecipe,
    calibrate_from_kl,
    kl_at_strength,
    next_token_kl,
    read_calibration,
    strength_at_kl,
    write_calibration,
)
from engine.calibration_sweep import SweepPoint, choose_strength

HIDDEN, LAYERS = 32, 4


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, vocab_size=128)
    return LlamaForCausalLM(config).eval()


def hand_kl(model, ids, delta_by_layer) -> float:
    """KL(q ‖ p) at the last position: one plain forward pass, one with `delta_by_layer[l]` added by hand
    to the last position's residual after layer l."""
    handles = []
    for layer, delta in delta_by_layer.items():
        def hook(_m, _a, output, delta=delta):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[:, -1] += delta
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        handles.append(model.model.layers[layer].register_forward_hook(hook))
    with torch.no_grad():
        steered = model(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        for handle in handles:
            handle.remove()
        plain = model(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    return float((steered.exp() * (steered - plain)).sum())


def test_batched_kl_equals_one_forward_per_row(model):
    generator = torch.Generator().manual_seed(3)
    directions = torch.nn.functional.normalize(torch.randn(5, HIDDEN, generator=generator), dim=-1)
    directions[4] = 0.0  # a dead feature: nothing moves
    prompts = [[1, 5, 9, 12, 7], [3, 3, 8]]
    strengths = [0.5, 2.0, 6.0]
    scales = {1: 0.5, 3: 2.0}
    kl = next_token_kl(model, prompts, directions, strengths, layer_scales=scales, rows_per_batch=4)
    assert kl.shape == (5, 3)
    for f in range(5):
        for s, strength in enumerate(strengths):
            expected = sum(hand_kl(model, ids, {layer: factor * strength * directions[f]
                                                for layer, factor in scales.items()}) for ids in prompts) / 2
            assert kl[f, s].item() == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert kl[4].abs().max() < 1e-6
    assert (kl[:4, 2] > kl[:4, 0]).all()  # more strength, more change


def test_strength_at_kl_inverts_a_power_law():
    strengths = [0.1, 1.0, 10.0]
    # KL = a s^2 for three features; the fourth never moves (a zero direction).
    a = torch.tensor([0.5, 2.0, 8.0, 0.0])
    kl = a.unsqueeze(1) * torch.tensor(strengths) ** 2
    found = strength_at_kl(kl, strengths, target=2.0)
    expected = [math.sqrt(2.0 / 0.5), 1.0, 0.5]
    assert found[:3].tolist() == pytest.approx(expected, rel=1e-4)
    assert math.isnan(found[3])
    # Beyond the grid: extended along the end segment (still KL = a s^2), bounded at 16× the grid.
    assert strength_at_kl(kl[:1], strengths, target=0.5 * 400)[0].item() == pytest.approx(20.0, rel=1e-4)
    assert strength_at_kl(kl[:1], strengths, target=1e9)[0].item() == pytest.approx(160.0, rel=1e-4)
    back = kl_at_strength(kl[:3], strengths, found[:3])
    assert back.tolist() == pytest.approx([2.0, 2.0, 2.0], rel=1e-4)


def test_calibration_ranges_and_refined_features(tmp_path):
    strengths = [0.1, 1.0, 10.0]
    kl = torch.tensor([[0.01, 1.0, 100.0], [0.0, 0.0, 0.0], [0.04, 4.0, 400.0]])
    out = calibrate_from_kl(kl, strengths, target=1.0, refined={2: 0.7})
    assert out["recommended"][0] == pytest.approx(1.0)
    assert out["low"][0] == pytest.approx(0.5) and out["high"][0] == pytest.approx(2.0)  # KL/4 and 4·KL
    assert out["recommended"][1] is None and out["source"][1] is None
    assert out["recommended"][2] == pytest.approx(0.7) and out["source"][2] == "sweep"
    assert out["low"][2] <= 0.7 <= out["high"][2]
    write_calibration(tmp_path, recipe=CalibrationRecipe(), residual_norm=10.0, strengths=out, method={"x": 1})
    again = read_calibration(tmp_path)
    assert again["recommended"] == out["recommended"] and again["residual_norm"] == 10.0
    (tmp_path / "calibration.json").write_text("{not json")
    assert read_calibration(tmp_path) is None


def test_sweep_choice_keeps_the_strongest_fluent_concept():
    points = [SweepPoint(0.1, hits=0, fluent=3, answers=3), SweepPoint(0.2, hits=2, fluent=3, answers=3),
              SweepPoint(0.3, hits=2, fluent=3, answers=3), SweepPoint(0.4, hits=3, fluent=2, answers=3)]
    assert choose_strength(points) == 0.3  # 0.4 writes more but is not fluent; a tie goes to the stronger
    assert choose_strength([SweepPoint(0.1, 0, 3, 3), SweepPoint(0.2, 0, 3, 3)]) == 0.2
    assert choose_strength([SweepPoint(0.2, 3, 1, 3), SweepPoint(0.1, 1, 2, 3)]) == 0.1
