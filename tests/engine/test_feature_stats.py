"""Running feature statistics against numpy on the same activations seen all at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.feature_stats import FeatureStatistics

D_SAE = 24


@pytest.fixture
def activations() -> np.ndarray:
    rng = np.random.default_rng(7)
    # Sparse like SAE activations: ReLU of shifted normals, each feature with its own scale.
    raw = rng.normal(loc=-0.5, scale=rng.uniform(0.5, 3.0, D_SAE), size=(300, D_SAE))
    return np.maximum(raw, 0.0).astype(np.float32)


def fed_in_chunks(activations: np.ndarray, sizes=(1, 37, 0, 100, 2, 160)) -> FeatureStatistics:
    assert sum(sizes) == len(activations)
    stats = FeatureStatistics(D_SAE)
    start = 0
    for size in sizes:
        stats.update(torch.from_numpy(activations[start : start + size]))
        start += size
    return stats


def test_chunked_updates_match_numpy(activations):
    stats = fed_in_chunks(activations)
    reference = activations.astype(np.float64)
    assert stats.total_tokens == 300
    np.testing.assert_allclose(stats.mean.numpy(), reference.mean(axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats.std.numpy(), reference.std(axis=0, ddof=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.sample_std.numpy(), reference.std(axis=0, ddof=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stats.min.numpy(), reference.min(axis=0))
    np.testing.assert_array_equal(stats.max.numpy(), reference.max(axis=0))
    np.testing.assert_array_equal(stats.active_count.numpy(), (reference > 0).sum(axis=0))
    np.testing.assert_allclose(stats.active_ratio.numpy(), (reference > 0).mean(axis=0), rtol=1e-12)


@pytest.mark.parametrize("metric", ["mean", "max", "std", "active_ratio"])
def test_top_n_matches_numpy_ranking(activations, metric):
    stats = fed_in_chunks(activations)
    reference = {
        "mean": activations.astype(np.float64).mean(axis=0),
        "max": activations.max(axis=0),
        "std": activations.astype(np.float64).std(axis=0),
        "active_ratio": (activations > 0).mean(axis=0),
    }[metric]
    top = stats.top(5, by=metric)
    # The five largest values in order, and indices that hold them (ties may pick either index).
    np.testing.assert_allclose(top.values, np.sort(reference)[::-1][:5], rtol=1e-5)
    np.testing.assert_allclose(reference[top.indices], top.values, rtol=1e-5)
    assert len(set(top.indices)) == 5


def test_top_smallest_and_unknown_metric(activations):
    stats = fed_in_chunks(activations)
    least_active = stats.top(3, by="active_count", largest=False)
    assert least_active.values == sorted((activations > 0).sum(axis=0).astype(float).tolist())[:3]
    with pytest.raises(ValueError, match="unknown feature metric"):
        stats.top(3, by="median")


def test_masked_rows_are_left_out(activations):
    # Rows 0..99 as a (2, 50) "batch" where every third position is padding.
    stats = FeatureStatistics(D_SAE)
    include = torch.ones(2, 50, dtype=torch.bool)
    include[:, ::3] = False
    block = torch.from_numpy(activations[:100]).reshape(2, 50, D_SAE)
    block[~include] = 1e6  # would dominate mean and max if it leaked in
    stats.update(block, include=include)
    kept = activations[:100][include.reshape(-1).numpy()].astype(np.float64)
    assert stats.total_tokens == len(kept)
    np.testing.assert_allclose(stats.mean.numpy(), kept.mean(axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats.std.numpy(), kept.std(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stats.max.numpy(), kept.max(axis=0))
    # An all-padding block changes nothing.
    before = stats.snapshot()
    stats.update(block, include=torch.zeros(2, 50, dtype=torch.bool))
    assert stats.snapshot() == before


def test_snapshot_and_reset(activations):
    stats = fed_in_chunks(activations)
    snapshot = stats.snapshot()
    assert snapshot["count"] == 300 and snapshot["d_sae"] == D_SAE
    assert len(snapshot["mean"]) == D_SAE and isinstance(snapshot["active_count"][0], int)
    stats.reset()
    empty = stats.snapshot()
    assert empty["count"] == 0 and empty["min"] is None and empty["max"] is None
    assert empty["mean"] == [0.0] * D_SAE and empty["std"] == [0.0] * D_SAE
