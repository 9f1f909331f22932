"""The rules every surface shares, written once: steering modes, positions, units and bounds, the SAE hook
names miLLM reads, the running-statistic names, and the OpenAI request limits.

No torch and no Django here: the engine, the inference contract (inference/messages.py), the /api and
/v1 schemas, the services and the profile file all derive from these names, so a new mode or a changed
bound is one edit.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from engine.errors import UnsupportedSaeError

# --- steering ---------------------------------------------------------------------------------------

SteeringMode = Literal["additive", "clamp"]
SteeringPositions = Literal["all", "generated_only"]
# raw: the strength multiplies the decoder row as is; max_activation: × the feature's largest observed
# activation; residual_norm: × the hooked layer's median residual norm (docs/steering.md).
StrengthUnit = Literal["raw", "max_activation", "residual_norm"]
# decoder: add the feature's decoder row W_dec[i]; concept: add its concept direction, the normalised mean
# unembedding of the tokens it is about (engine/steering.py), which makes a model write the concept.
SteeringDirection = Literal["decoder", "concept"]
MAX_STEERING_LAYERS = 64
# SteeringSpec.max_steered_tokens: steer only the first N generated tokens (1..this); past any context a model has.
MAX_STEERED_TOKENS = 1 << 16
STEERING_MODES: tuple[str, ...] = get_args(SteeringMode)
STEERING_POSITIONS: tuple[str, ...] = get_args(SteeringPositions)
STRENGTH_UNITS: tuple[str, ...] = get_args(StrengthUnit)
STEERING_DIRECTIONS: tuple[str, ...] = get_args(SteeringDirection)
# Residual norms of small models are O(10²) (SmolLM2 layer 15: median ≈ 174) and ≈ 700 along one
# decoder row already collapses the text, so anything past this is a typo, not an experiment.
MAX_ABS_STRENGTH = 1000.0
MAX_FEATURE_INDEX = (1 << 31) - 1  # what the transport carries; each SAE's own width is checked too

# Features returned per request (`return_features`): which tokens, and how much per token.
FeaturePositions = Literal["all", "prompt", "generated"]
FEATURE_POSITIONS: tuple[str, ...] = get_args(FeaturePositions)
MAX_RETURN_TOP_K = 100
MAX_RETURN_FEATURES = 256


def feature_index_problem(index: object, d_sae: int) -> str | None:
    """Why `index` is not a feature of an SAE `d_sae` wide, or None when it is."""
    if isinstance(index, bool) or not isinstance(index, int):
        return "must be an integer"
    if not 0 <= index < d_sae:
        return f"{index} is outside 0..{d_sae - 1}"
    return None


# --- steering sweeps (POST /api/steering/sweep) --------------------------------------------------------

# Every strength × prompt is one greedy generation, all submitted at once (the scheduler batches them).
MAX_SWEEP_STRENGTHS = 16
MAX_SWEEP_PROMPTS = 8
MAX_SWEEP_RUNS = 64  # strengths × prompts, the unsteered baseline (strength 0) included
SWEEP_INLINE_RUNS = 16  # up to this many the answer comes inline; above, a background job to poll
MAX_SWEEP_TOKENS = 256


# --- SAE hooks ---------------------------------------------------------------------------------------

_RESID_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(post|pre)$")
_HF_LAYER_HOOK = re.compile(r"^model\.layers\.(\d+)$")


def hook_layer_from_name(hook_name: str) -> int:
    """Decoder-layer index whose output is the residual stream the hook name points at.

    `blocks.L.hook_resid_post` is the output of layer L; `blocks.L.hook_resid_pre` (L >= 1) is the
    input of layer L, i.e. the output of layer L-1; `model.layers.L` is layer L's output. The embeddings
    (resid_pre of block 0) are not a decoder layer's output and are refused.
    """
    match = _RESID_HOOK.match(hook_name)
    if match:
        layer, kind = int(match.group(1)), match.group(2)
        if kind == "post":
            return layer
        if layer >= 1:
            return layer - 1
        raise UnsupportedSaeError("an SAE on blocks.0.hook_resid_pre (the embeddings) is not supported")
    match = _HF_LAYER_HOOK.match(hook_name)
    if match:
        return int(match.group(1))
    raise UnsupportedSaeError(
        f"hook {hook_name!r} is not a residual-stream hook; expected blocks.<layer>.hook_resid_post"
    )


# --- running statistics ----------------------------------------------------------------------------

FeatureMetric = Literal["mean", "std", "sample_std", "min", "max", "active_ratio", "active_count", "mean_when_active"]
FEATURE_METRICS: tuple[str, ...] = get_args(FeatureMetric)

# --- OpenAI request limits (OpenAI's own, where it has one) ---------------------------------------------

MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20  # chat
MAX_TEMPERATURE = 2.0
LOGIT_BIAS_LIMIT = 100.0  # values beyond ±100 are clamped, as OpenAI does
