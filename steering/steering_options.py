"""How a steering is applied, beside which features and how strongly: mode, positions, units, the extra layers
and the direction — resolved from a request (or from the SAE's recommended preset) and checked once.

An SAE folder may carry `steering.json`, the setting its builder measured to work (the demo SAE: the concept
direction added at layers 8–23, generated positions only, 0.14 × each layer's residual norm, until the concept is
written and for at most 15 tokens; see docs/steering.md). `preset: "recommended"` applies it, so one flag gives a researcher the steering that
makes the model write the feature's concept.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from engine.rules import (
    MAX_STEERED_TOKENS,
    MAX_STEERING_LAYERS,
    STEERING_DIRECTIONS,
    STEERING_MODES,
    STEERING_POSITIONS,
    STRENGTH_UNITS,
)
from millm_site.errors import ValidationFailed
from steering.models import SparseAutoencoder

PRESETS = ("recommended",)
RECOMMENDATION_FILE = "steering.json"


@dataclass(frozen=True)
class SteeringOptions:
    mode: str = "additive"
    positions: str = "all"
    units: str = "raw"
    layers: tuple[int, ...] = ()
    direction: str = "decoder"
    max_steered_tokens: int | None = None  # steer only the first N generated tokens (SteeringSpec)
    until_concept: bool = False  # stop once a steered feature's concept token is written (SteeringSpec)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "layers": list(self.layers)}


def sae_steering_recommendation(sae: SparseAutoencoder) -> dict[str, Any] | None:
    """The SAE's recommended steering (its folder's steering.json), or None when it has none."""
    path = Path(sae.local_path or "") / RECOMMENDATION_FILE
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return None
    return _read_recommendation(str(path), stamp)


@lru_cache(maxsize=32)
def _read_recommendation(path: str, stamp: int) -> dict[str, Any] | None:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    keys = ("mode", "positions", "units", "layers", "direction", "recommended_strength", "strength_range")
    if not isinstance(raw, dict) or not all(k in raw for k in keys):
        return None
    # Added later (issue 11): a steering.json without them means neither (the demo build rewrites its own when
    # its recipe version changes, engine/assets/smollm2.py ensure_steering_assets: seconds, no retraining).
    return {**{k: raw[k] for k in keys}, "max_steered_tokens": raw.get("max_steered_tokens"),
            "until_concept": raw.get("until_concept", False)}


def steering_options_resolve(*, sae: SparseAutoencoder | None, mode: str = "additive", positions: str = "all",
                             units: str = "raw", layers: list[int] | tuple[int, ...] | None = None,
                             direction: str = "decoder", preset: str | None = None,
                             max_steered_tokens: int | None = None, until_concept: bool = False) -> SteeringOptions:
    """The options a request asks for (a preset replaces them all), refused whole when one is wrong."""
    if preset is not None:
        if preset not in PRESETS:
            raise ValidationFailed(f"preset: must be one of {', '.join(PRESETS)}", details={"field": "preset"})
        recommendation = sae_steering_recommendation(sae) if sae is not None else None
        if recommendation is None:
            name = sae.name if sae is not None else "(none attached)"
            raise ValidationFailed(f"preset: SAE {name} has no recommended steering", details={"field": "preset"})
        mode, positions, units = recommendation["mode"], recommendation["positions"], recommendation["units"]
        layers, direction = recommendation["layers"], recommendation["direction"]
        max_steered_tokens, until_concept = recommendation["max_steered_tokens"], recommendation["until_concept"]
    for field, value, choices in (("mode", mode, STEERING_MODES), ("positions", positions, STEERING_POSITIONS),
                                  ("units", units, STRENGTH_UNITS), ("direction", direction, STEERING_DIRECTIONS)):
        if value not in choices:
            raise ValidationFailed(f"{field}: must be one of {', '.join(choices)}", details={"field": field})
    layers = tuple(layers or ())
    if any(isinstance(layer, bool) or not isinstance(layer, int) for layer in layers):
        raise ValidationFailed("layers: must be integers", details={"field": "layers"})
    if len(set(layers)) != len(layers) or len(layers) > MAX_STEERING_LAYERS:
        raise ValidationFailed(f"layers: at most {MAX_STEERING_LAYERS}, each once", details={"field": "layers"})
    num_layers = sae.model.num_layers if sae is not None else None
    if num_layers and any(not 0 <= layer < num_layers for layer in layers):
        raise ValidationFailed(f"layers: the model has layers 0..{num_layers - 1}", details={"field": "layers"})
    if (layers or direction != "decoder") and mode != "additive":
        raise ValidationFailed("layers and direction apply to additive steering only", details={"field": "mode"})
    if max_steered_tokens is not None and (isinstance(max_steered_tokens, bool) or not isinstance(max_steered_tokens, int)
                                           or not 1 <= max_steered_tokens <= MAX_STEERED_TOKENS):
        raise ValidationFailed(f"max_steered_tokens: must be an integer in 1..{MAX_STEERED_TOKENS} (or null)",
                               details={"field": "max_steered_tokens"})
    if not isinstance(until_concept, bool):
        raise ValidationFailed("until_concept: must be true or false", details={"field": "until_concept"})
    return SteeringOptions(mode=mode, positions=positions, units=units, layers=layers, direction=direction,
                           max_steered_tokens=max_steered_tokens, until_concept=until_concept)
