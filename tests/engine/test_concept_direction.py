"""Concept directions (SteeringSpec.direction = "concept") and the steering-quality rules, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from engine.assets import steering_quality as quality
from engine.assets.smollm2 import label_token_ids
from engine.sae import SaeWeights
from engine.steering import (
    InvalidSteeringError,
    SteeringFeature,
    SteeringSpec,
    compile_steering,
    concept_direction_matrix,
)

# Unembedding rows [3, 4], [1, 0], [0, 2] normalise to [.6, .8], [1, 0], [0, 1].
UNEMBEDDING = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
TOKENS = torch.tensor([[0, -1], [1, 2], [-1, -1]])  # feature 2 has no tokens (dead)
R = 1 / math.sqrt(2)


def hand_sae() -> SaeWeights:
    return SaeWeights(architecture="standard", hook_name="blocks.0.hook_resid_post", hook_layer=0,
                      W_enc=torch.eye(2, 3), b_enc=torch.zeros(3), W_dec=torch.eye(3, 2), b_dec=torch.zeros(2))


def test_concept_direction_is_the_normalised_mean_of_normalised_unembeddings():
    directions = concept_direction_matrix(UNEMBEDDING, TOKENS)
    # Feature 1: mean of [1, 0] and [0, 1] = [.5, .5] -> [1/√2, 1/√2]. Feature 2: nothing to add.
    torch.testing.assert_close(directions, torch.tensor([[0.6, 0.8], [R, R], [0.0, 0.0]]))


def test_concept_steering_adds_the_concept_direction_not_the_decoder_row():
    directions = concept_direction_matrix(UNEMBEDDING, TOKENS)
    spec = SteeringSpec(features=(SteeringFeature(0, 10.0), SteeringFeature(1, -2.0)), direction="concept")
    compiled = compile_steering(hand_sae(), spec, concept_directions=directions)
    torch.testing.assert_close(compiled.additive_delta, torch.tensor([6.0 - 2 * R, 8.0 - 2 * R]))
    decoder = compile_steering(hand_sae(), SteeringSpec(features=(SteeringFeature(0, 10.0),)))
    torch.testing.assert_close(decoder.additive_delta, torch.tensor([10.0, 0.0]))  # W_dec[0] = [1, 0]


@pytest.mark.parametrize("spec, directions, message", [
    (SteeringSpec(features=(SteeringFeature(0, 1.0),), direction="concept"), None, "no concept directions"),
    (SteeringSpec(features=(SteeringFeature(0, 1.0),), mode="clamp", direction="concept"), "yes", "additive"),
    (SteeringSpec(features=(SteeringFeature(0, 1.0),), direction="logits"), "yes", "direction must be one of"),
])
def test_bad_concept_steering_is_refused(spec, directions, message):
    concept = concept_direction_matrix(UNEMBEDDING, TOKENS) if directions else None
    with pytest.raises(InvalidSteeringError, match=message):
        compile_steering(hand_sae(), spec, concept_directions=concept)


def test_label_tokens_become_single_token_ids():
    vocab = {" Paris": [7], " France": [9], "…": [1, 2]}
    assert label_token_ids("' Paris', ' France', 'Fra…'", lambda text: vocab.get(text, [3, 4])) == [7, 9]
    assert label_token_ids("'\\n', \"'s\"", lambda text: {"\n": [5], "'s": [6]}[text]) == [5, 6]


def test_concept_words_fluency_and_hit_rate_rules():
    assert quality.concept_words("' Seoul', ' Korea', 'icates', ' the', ','") == ["seoul", "korea"]
    assert quality.mentions("Dogs bark.", ["dog"]) and not quality.mentions("hotdog", ["dog"])
    assert quality.is_fluent([1, 2, 1, 2])  # distinct ratio 2/4 = 0.5: allowed
    assert not quality.is_fluent([1, 2, 1, 2, 1, 2])  # 2/6 < 0.5
    assert not quality.is_fluent([5] * 9 + list(range(20, 40)))  # a run of 9
    assert quality.is_fluent([5] * 8 + list(range(20, 40)))  # a run of 8 is allowed
    assert quality.hit_rate({1: ["a dog", "dogs", "cat"], 2: ["dog", "x", "y"]}, {1: ["dog"], 2: ["dog"]}) == 0.5
