"""calibration.json, the per-feature strengths of an SAE (engine/calibration.py computes them): its format,
written and read without torch, so the web tier can show them.

    {"version": 1, "units": "raw", "recipe": {mode, direction, positions, layers}, "residual_norm": n_L,
     "method": {...how they were found...},
     "recommended": [d_sae raw strengths or null], "low": [...], "high": [...], "source": ["sweep"|"kl"|null]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CALIBRATION_FILE = "calibration.json"
CALIBRATION_VERSION = 1


@dataclass(frozen=True)
class CalibrationRecipe:
    """Which steering the strengths are for (the same fields as engine.steering.SteeringSpec)."""

    direction: str = "decoder"
    layers: tuple[int, ...] = ()
    positions: str = "all"
    mode: str = "additive"
    max_steered_tokens: int | None = None
    until_concept: bool = False

    def as_dict(self) -> dict[str, Any]:
        stop = ({"max_steered_tokens": self.max_steered_tokens, "until_concept": self.until_concept}
                if self.max_steered_tokens is not None or self.until_concept else {})  # files written before: same
        return {"mode": self.mode, "direction": self.direction, "positions": self.positions,
                "layers": list(self.layers), **stop}


def write_calibration(sae_dir: Path, *, recipe: CalibrationRecipe, residual_norm: float,
                      strengths: dict[str, list[float | None]], method: dict[str, Any]) -> Path:
    """sae_dir/calibration.json: raw strengths per feature, the recipe they are for and how they were found."""
    path = Path(sae_dir) / CALIBRATION_FILE
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps({"version": CALIBRATION_VERSION, "units": "raw", "recipe": recipe.as_dict(),
                                   "residual_norm": residual_norm, "method": method, **strengths}))
    partial.replace(path)
    return path


def read_calibration(sae_dir: Path) -> dict[str, Any] | None:
    path = Path(sae_dir) / CALIBRATION_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("version") != CALIBRATION_VERSION:
        return None
    return raw
