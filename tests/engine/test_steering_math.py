"""Steering math on a hand-sized SAE, against numbers worked out by hand in the comments.

The SAE (d_in=2, d_sae=3), ReLU unless a test says otherwise:
    W_enc = [[1, 0, 1],      b_enc = [0, 0, -1]
             [0, 1, 1]]
    W_dec = [[1, 0],         b_dec = [1, 0]      (subtracted from the input before encoding)
             [0, 2],
             [1, 1]]
Token A, h = [3, 2]:
    h - b_dec = [2, 2];  pre = [2, 2, 2+2-1] = [2, 2, 3];  f = relu(pre) = [2, 2, 3]
    x̂ = 2·[1,0] + 2·[0,2] + 3·[1,1] + [1,0] = [6, 7];     e = h - x̂ = [-3, -5]
Token B, h = [0, 0]:
    h - b_dec = [-1, 0]; pre = [-1, 0, -2];  f = [0, 0, 0];  x̂ = b_dec = [1, 0];  e = [-1, 0]
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.sae import SaeWeights
from engine.steering import (
    InvalidFeatureIndexError,
    InvalidSteeringError,
    SteeringFeature,
    SteeringSpec,
    apply_steering,
    batch_steering,
    compile_steering,
)

TOKEN_A = [3.0, 2.0]
TOKEN_B = [0.0, 0.0]


def hand_sae(architecture: str = "standard", **extra) -> SaeWeights:
    return SaeWeights(
        architecture=architecture,
        hook_name="blocks.0.hook_resid_post",
        hook_layer=0,
        W_enc=torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]),
        b_enc=torch.tensor([0.0, 0.0, -1.0]),
        W_dec=torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]),
        b_dec=torch.tensor([1.0, 0.0]),
        **extra,
    )


def spec(*features: tuple[int, float], mode: str = "additive", positions: str = "all") -> SteeringSpec:
    return SteeringSpec(features=[SteeringFeature(i, s) for i, s in features], mode=mode, positions=positions)


def tokens(*rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows)  # (B, T, d_in)


def test_encode_and_decode_by_hand():
    sae = hand_sae()
    assert sae.encode(torch.tensor([TOKEN_A, TOKEN_B])).tolist() == [[2, 2, 3], [0, 0, 0]]
    assert sae.decode(torch.tensor([2.0, 2.0, 3.0])).tolist() == [6, 7]


def test_additive_adds_the_weighted_decoder_rows():
    # delta = 2·W_dec[0] - 1·W_dec[2] = [2, 0] - [1, 1] = [1, -1]
    # A: [3, 2] + [1, -1] = [4, 1];  B: [0, 0] + [1, -1] = [1, -1]
    compiled = compile_steering(hand_sae(), spec((0, 2.0), (2, -1.0)))
    assert compiled.additive_delta.tolist() == [1, -1]
    steered = apply_steering(tokens([TOKEN_A, TOKEN_B]), [compiled])
    assert steered.tolist() == [[[4, 1], [1, -1]]]


def test_clamp_sets_the_features_and_keeps_the_error_term():
    # Clamp f1 := 5, f2 := 0.
    # A: f' = [2, 5, 0];  x̂' = 2·[1,0] + 5·[0,2] + [1,0] = [3, 10];  h' = x̂' + e = [3-3, 10-5] = [0, 5]
    #    (same as h + (5-2)·[0,2] + (0-3)·[1,1] = [3,2] + [0,6] + [-3,-3] = [0, 5])
    # B: f' = [0, 5, 0];  x̂' = [0, 10] + [1, 0] = [1, 10];       h' = x̂' + e = [1-1, 10+0] = [0, 10]
    sae = hand_sae()
    compiled = compile_steering(sae, spec((1, 5.0), (2, 0.0), mode="clamp"))
    h = tokens([TOKEN_A, TOKEN_B])
    steered = apply_steering(h, [compiled])
    assert steered.tolist() == [[[0, 5], [0, 10]]]

    # The same through the definition, with sae.decode: x̂' + e.
    clamped_f = sae.encode(h)
    clamped_f[..., 1], clamped_f[..., 2] = 5.0, 0.0
    error = h - sae.decode(sae.encode(h))
    assert torch.equal(steered, sae.decode(clamped_f) + error)


def test_clamp_jumprelu_uses_the_threshold():
    # threshold = [2.5, 0, 0]: on A, pre_0 = 2 is not > 2.5, so f_0 = 0 (ReLU alone would give 2).
    # Clamp f0 := 4: h' = h + (4 - 0)·[1, 0] = [7, 2]   (ReLU SAE: [3,2] + (4-2)·[1,0] = [5, 2])
    jumprelu = hand_sae("jumprelu", threshold=torch.tensor([2.5, 0.0, 0.0]))
    assert jumprelu.encode(torch.tensor(TOKEN_A)).tolist() == [0, 2, 3]
    clamp_f0 = spec((0, 4.0), mode="clamp")
    assert apply_steering(tokens([TOKEN_A]), [compile_steering(jumprelu, clamp_f0)]).tolist() == [[[7, 2]]]
    assert apply_steering(tokens([TOKEN_A]), [compile_steering(hand_sae(), clamp_f0)]).tolist() == [[[5, 2]]]


def test_clamp_topk_encodes_all_features():
    # k=1: on A, pre = [2, 2, 3] keeps only f2 = 3, so f = [0, 0, 3] and f1 = 0 (not 2 as under ReLU).
    # Clamp f1 := 5: h' = h + (5 - 0)·[0, 2] = [3, 12].
    # Check by definition: x̂ = 3·[1,1] + [1,0] = [4, 3], e = [-1, -1];
    #   f' = [0, 5, 3], x̂' = [0, 10] + [3, 3] + [1, 0] = [4, 13], h' = x̂' + e = [3, 12].
    topk = hand_sae("topk", k=1)
    assert topk.encode(torch.tensor(TOKEN_A)).tolist() == [0, 0, 3]
    compiled = compile_steering(topk, spec((1, 5.0), mode="clamp"))
    assert compiled.full_encoder is topk
    assert apply_steering(tokens([TOKEN_A]), [compiled]).tolist() == [[[3, 12]]]


def test_generated_only_leaves_prompt_positions_untouched():
    # Row 0 = [A (prompt), B (generated)], additive delta [1, -1] on generated positions only:
    #   A stays [3, 2]; B becomes [1, -1].
    # Row 1 = the same tokens with positions="all" (delta 2·W_dec[1] = [0, 4]): [3, 6], [0, 4].
    sae = hand_sae()
    generated_only = compile_steering(sae, spec((0, 2.0), (2, -1.0), positions="generated_only"))
    everywhere = compile_steering(sae, spec((1, 2.0)))
    h = tokens([TOKEN_A, TOKEN_B], [TOKEN_A, TOKEN_B])
    generated = torch.tensor([[False, True], [False, True]])
    valid = torch.ones(2, 2, dtype=torch.bool)
    steered = apply_steering(h, [generated_only, everywhere], generated, valid)
    assert steered.tolist() == [[[3, 2], [1, -1]], [[3, 6], [0, 4]]]
    # Without a generated mask nothing counts as generated: the generated_only row is left alone.
    assert apply_steering(h, [generated_only, everywhere])[0].tolist() == [[3, 2], [0, 0]]


def test_per_row_steering_none_additive_clamp_and_padding():
    # Three rows of [A, B]; row 2's first position is padding (never steered).
    #   row 0: no steering          -> [3, 2], [0, 0]
    #   row 1: additive [1, -1]     -> [4, 1], [1, -1]
    #   row 2: clamp f1:=5, f2:=0   -> pad [3, 2] untouched, B -> [0, 10]
    sae = hand_sae()
    additive = compile_steering(sae, spec((0, 2.0), (2, -1.0)))
    clamp = compile_steering(sae, spec((1, 5.0), (2, 0.0), mode="clamp"))
    h = tokens([TOKEN_A, TOKEN_B], [TOKEN_A, TOKEN_B], [TOKEN_A, TOKEN_B])
    original = h.clone()
    valid = torch.tensor([[True, True], [True, True], [False, True]])
    generated = torch.zeros(3, 2, dtype=torch.bool)
    steered = apply_steering(h, [None, additive, clamp], generated, valid)
    assert steered.tolist() == [[[3, 2], [0, 0]], [[4, 1], [1, -1]], [[3, 2], [0, 10]]]
    assert torch.equal(h, original)  # never in place: the layer output may be kept by the caller

    # A prebuilt batch (what the hook caches) gives the same result.
    batch = batch_steering([None, additive, clamp], device=h.device, dtype=h.dtype)
    assert torch.equal(apply_steering(h, batch, generated, valid), steered)


def test_clamp_rows_with_different_feature_counts_are_padded_harmlessly():
    # Row 0 clamps f1 := 5 only:   A -> [3,2] + (5-2)·[0,2] = [3, 8]
    # Row 1 clamps f1 := 5, f2 := 0 (the earlier example): A -> [0, 5]
    sae = hand_sae()
    one = compile_steering(sae, spec((1, 5.0), mode="clamp"))
    two = compile_steering(sae, spec((1, 5.0), (2, 0.0), mode="clamp"))
    assert apply_steering(tokens([TOKEN_A], [TOKEN_A]), [one, two]).tolist() == [[[3, 8]], [[0, 5]]]


def test_no_steering_returns_the_input_itself():
    h = tokens([TOKEN_A])
    assert apply_steering(h, [None]) is h


@pytest.mark.parametrize(
    ("bad_spec", "error"),
    [
        (spec((3, 1.0)), InvalidFeatureIndexError),  # d_sae = 3
        (spec((-1, 1.0)), InvalidFeatureIndexError),
        (SteeringSpec(features=[SteeringFeature(True, 1.0)]), InvalidFeatureIndexError),  # type: ignore[arg-type]
        (spec((0, math.nan)), InvalidSteeringError),
        (spec((0, math.inf)), InvalidSteeringError),
        (spec((0, -math.inf), mode="clamp"), InvalidSteeringError),
        (spec((0, 1e6)), InvalidSteeringError),
        (spec((0, 1.0), (0, 2.0)), InvalidSteeringError),
        (spec((0, 1.0), mode="multiply"), InvalidSteeringError),
        (spec((0, 1.0), positions="prompt"), InvalidSteeringError),
    ],
)
def test_invalid_steering_is_refused(bad_spec, error):
    with pytest.raises(error):
        compile_steering(hand_sae(), bad_spec)


def test_strength_bound_is_configurable():
    compile_steering(hand_sae(), spec((0, 50.0)), max_abs_strength=50.0)
    with pytest.raises(InvalidSteeringError):
        compile_steering(hand_sae(), spec((0, 50.5)), max_abs_strength=50.0)
