"""Facts about one SAE feature read from the SAE's own files (no model weights in the web tier).

- most similar features: cosine of decoder rows, `W_dec[i]·W_dec[j] / (|W_dec[i]| |W_dec[j]|)`;
- density, max and mean activation: `feature_stats.safetensors` when the SAE was built with one.
The unit-norm decoder (d_sae × d_in float32) is cached per file: 7 MB for the demo SAE.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from steering.models import SparseAutoencoder

WEIGHTS_FILE = "sae_weights.safetensors"
STATS_FILE = "feature_stats.safetensors"


@lru_cache(maxsize=4)
def _unit_decoder(path: str, mtime: float) -> np.ndarray:
    with safe_open(path, framework="numpy") as weights:
        w_dec = weights.get_tensor("W_dec").astype(np.float32)  # [d_sae, d_in]
    norms = np.linalg.norm(w_dec, axis=1, keepdims=True)
    return w_dec / np.maximum(norms, 1e-12)


@lru_cache(maxsize=4)
def _stats(path: str, mtime: float) -> dict[str, np.ndarray]:
    with safe_open(path, framework="numpy") as stats:
        return {key: stats.get_tensor(key) for key in stats.keys()}  # noqa: SIM118 - safe_open has no __iter__


def _file(sae: SparseAutoencoder, name: str) -> Path | None:
    path = Path(sae.local_path) / name if sae.local_path else None
    return path if path is not None and path.is_file() else None


def similar_features(*, sae: SparseAutoencoder, index: int, count: int = 10) -> list[dict[str, Any]]:
    """The features whose decoder direction is closest to this one's (not itself), with their labels."""
    path = _file(sae, WEIGHTS_FILE)
    if path is None:
        return []
    unit = _unit_decoder(str(path), path.stat().st_mtime)
    if not 0 <= index < unit.shape[0]:
        return []
    cosine = unit @ unit[index]  # [d_sae]
    cosine[index] = -np.inf
    top = np.argpartition(-cosine, min(count, len(cosine) - 1))[:count]
    top = top[np.argsort(-cosine[top])]
    labels = dict(sae.labels.filter(index__in=top.tolist()).values_list("index", "label"))
    return [{"index": int(j), "cosine": float(cosine[j]), "label": labels.get(int(j), "")} for j in top]


def feature_file_stats(*, sae: SparseAutoencoder, index: int) -> dict[str, float]:
    """Activation density and sizes measured when the SAE was built (empty when it has no stats file)."""
    path = _file(sae, STATS_FILE)
    if path is None:
        return {}
    stats = _stats(str(path), path.stat().st_mtime)
    return {key: float(values[index]) for key, values in stats.items() if values.ndim == 1 and index < len(values)}
