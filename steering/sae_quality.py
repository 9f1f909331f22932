"""What an SAE's own folder says about its quality: L0, FVU / explained variance, dead-feature share.

sae-lens' cfg.json carries none of these; the demo builds write them to `manifest.json` beside the
SAE folder (engine/assets/smollm2.py: metrics.fvu_held_out, l0_held_out, dead_fraction), and some
published SAEs ship a `metrics.json`/`sparsity` summary in the folder. What is not known stays None.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from steering.models import SparseAutoencoder

_FVU = ("fvu_held_out", "fvu")
_L0 = ("l0_held_out", "l0", "mean_l0")
_DEAD = ("dead_fraction", "dead_feature_fraction")
_EXPLAINED = ("explained_variance", "ce_explained_variance")


@dataclass(frozen=True)
class SaeQuality:
    l0: float | None = None
    fvu: float | None = None
    explained_variance: float | None = None
    dead_fraction: float | None = None


def _first(metrics: dict, keys: tuple[str, ...]) -> float | None:
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


@lru_cache(maxsize=64)
def _read(path: str, mtime: float) -> SaeQuality:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return SaeQuality()
    metrics = data.get("metrics", data) if isinstance(data, dict) else {}
    if not isinstance(metrics, dict):
        return SaeQuality()
    fvu, explained = _first(metrics, _FVU), _first(metrics, _EXPLAINED)
    if explained is None and fvu is not None:
        explained = 1.0 - fvu  # explained variance is 1 - FVU by definition
    if fvu is None and explained is not None:
        fvu = 1.0 - explained
    return SaeQuality(l0=_first(metrics, _L0), fvu=fvu, explained_variance=explained,
                      dead_fraction=_first(metrics, _DEAD))


def sae_quality(*, sae: SparseAutoencoder) -> SaeQuality:
    if not sae.local_path:
        return SaeQuality()
    folder = Path(sae.local_path)
    for candidate in (folder / "metrics.json", folder.parent / "manifest.json"):
        try:
            mtime = candidate.stat().st_mtime
        except OSError:
            continue
        return _read(str(candidate), mtime)
    return SaeQuality()
