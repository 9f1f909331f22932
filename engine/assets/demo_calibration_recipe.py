"""Whether a demo SAE folder holds the demo recipe's calibration.json: torch-free, so `manage.py serve` decides
whether to queue the background calibration without importing torch (engine/assets/smollm2.py computes it)."""

from __future__ import annotations

from pathlib import Path

from engine.calibration_file import read_calibration

CALIBRATION_RECIPE_VERSION = 2  # 2: swept with the preset's until_concept and max_steered_tokens


def demo_calibration_current(sae_dir: Path) -> bool:
    """True when sae_dir/calibration.json was computed by this version of the demo recipe."""
    found = read_calibration(Path(sae_dir)) or {}
    return found.get("method", {}).get("demo_recipe") == CALIBRATION_RECIPE_VERSION
