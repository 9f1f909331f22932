"""Running per-feature statistics of SAE activations, kept as tensors.

Every token updates every feature, so the token count is one scalar; the per-feature state is
mean, M2 (sum of squared deviations), min, max and the count of tokens where the feature fired
(> 0). A block of N tokens is folded in with Chan et al.'s parallel form of Welford's update:
one reduction over the block, then an O(d_sae) merge, no Python loop over features and no host
sync, so the hook can call it every forward step. The running state is float64 (long runs add
millions of small blocks; float32 on MPS); block reductions run in float32 in the activations' device.

`std` is the population standard deviation (ddof=0, numpy's default); `sample_std` is ddof=1.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

import torch

from engine.rules import FEATURE_METRICS

METRICS = FEATURE_METRICS


class TopFeatures(NamedTuple):
    indices: list[int]
    values: list[float]


class FeatureStatistics:
    def __init__(self, d_sae: int, *, device: torch.device | str = "cpu") -> None:
        self.d_sae = d_sae
        self.device = torch.device(device)
        # float64 keeps long runs exact enough; MPS has no float64.
        self.state_dtype = torch.float32 if self.device.type == "mps" else torch.float64
        # The hook updates from the inference thread while management calls read snapshots.
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        def zeros() -> torch.Tensor:
            return torch.zeros(self.d_sae, dtype=self.state_dtype, device=self.device)

        with self._lock:
            self.count = torch.zeros((), dtype=self.state_dtype, device=self.device)
            self.mean = zeros()
            self.m2 = zeros()
            self.min = torch.full((self.d_sae,), torch.inf, dtype=self.state_dtype, device=self.device)
            self.max = torch.full((self.d_sae,), -torch.inf, dtype=self.state_dtype, device=self.device)
            self.active_count = zeros()

    def update(self, activations: torch.Tensor, include: torch.Tensor | None = None) -> None:
        """Fold in activations (..., d_sae); `include` (the leading shape, bool) drops e.g. padding."""
        block = activations.reshape(-1, self.d_sae).to(torch.float32)
        if block.shape[0] == 0:
            return
        if include is None:
            block_count = torch.tensor(float(block.shape[0]), dtype=torch.float32, device=block.device)
            block_mean = block.mean(dim=0)
            block_m2 = (block - block_mean).square().sum(dim=0)
            block_min, block_max = block.amin(dim=0), block.amax(dim=0)
            block_active = (block > 0).sum(dim=0).to(torch.float32)
        else:
            # Weighted by a 0/1 mask rather than boolean-indexed: indexing would sync with the host.
            keep = include.reshape(-1, 1).to(device=block.device)
            weight = keep.to(torch.float32).squeeze(1)
            block_count = weight.sum()
            block_mean = (weight @ block) / block_count.clamp(min=1)
            block_m2 = weight @ (block - block_mean).square()
            block_min = block.masked_fill(~keep, torch.inf).amin(dim=0)
            block_max = block.masked_fill(~keep, -torch.inf).amax(dim=0)
            block_active = weight @ (block > 0).to(torch.float32)
        with self._lock:
            self._merge(block_count, block_mean, block_m2, block_min, block_max, block_active)

    def _merge(self, *block_stats: torch.Tensor) -> None:
        count_b, mean_b, m2_b, min_b, max_b, active_b = (
            t.to(device=self.device, dtype=self.state_dtype) for t in block_stats
        )
        count_a = self.count
        total = count_a + count_b
        delta = mean_b - self.mean
        share_b = count_b / total.clamp(min=1)  # 0 for an all-masked block: state unchanged
        self.mean = self.mean + delta * share_b
        self.m2 = self.m2 + m2_b + delta.square() * count_a * share_b
        self.min = torch.minimum(self.min, min_b)
        self.max = torch.maximum(self.max, max_b)
        self.active_count = self.active_count + active_b
        self.count = total

    @property
    def total_tokens(self) -> int:
        return int(self.count.item())

    @property
    def std(self) -> torch.Tensor:
        """Population standard deviation (ddof=0)."""
        return (self.m2 / self.count.clamp(min=1)).sqrt()

    @property
    def sample_std(self) -> torch.Tensor:
        """Sample standard deviation (ddof=1); 0 until two tokens were seen."""
        return (self.m2 / (self.count - 1).clamp(min=1)).sqrt()

    @property
    def active_ratio(self) -> torch.Tensor:
        return self.active_count / self.count.clamp(min=1)

    @property
    def mean_when_active(self) -> torch.Tensor:
        """Mean activation over the tokens where the feature fired (0 where it never did)."""
        return self.mean * self.count / self.active_count.clamp(min=1)

    def metric(self, name: str) -> torch.Tensor:
        if name not in METRICS:
            raise ValueError(f"unknown feature metric {name!r}; one of {', '.join(METRICS)}")
        return getattr(self, name)

    def top(self, n: int, by: str = "mean", *, largest: bool = True) -> TopFeatures:
        """The n features with the largest (or smallest) value of a metric."""
        with self._lock:
            values = self.metric(by)
            top_values, top_indices = torch.topk(values, k=max(0, min(n, self.d_sae)), largest=largest)
        return TopFeatures(indices=top_indices.tolist(), values=top_values.tolist())

    def snapshot(self) -> dict[str, Any]:
        """Plain Python lists (min/max are None until a token was seen: ±inf is not JSON)."""
        with self._lock:
            seen = self.total_tokens > 0
            return {
                "d_sae": self.d_sae,
                "count": self.total_tokens,
                "mean": self.mean.tolist(),
                "std": self.std.tolist(),
                "min": self.min.tolist() if seen else None,
                "max": self.max.tolist() if seen else None,
                "active_count": [int(c) for c in self.active_count.tolist()],
                "active_ratio": self.active_ratio.tolist(),
            }
