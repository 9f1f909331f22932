"""The seam between the generation loop and whatever rides on the model's forward pass.

The scheduler knows nothing about SAEs: before every forward pass it hands the registered
interceptors a ForwardContext describing the batch rows, and after the pass it lets them collect
what they captured. The SAE hook (steering + monitoring) is one such interceptor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class RowInfo:
    request_id: str
    steering: Any | None  # opaque to the scheduler: a CompiledSteering built by the steering module
    monitor: bool  # capture per-token features for this row
    features: Any | None = None  # opaque: the request's own feature capture (engine.request_features)
    conditions: Any | None = None  # opaque: conditional steering and abort (engine.steering_conditions)


@dataclass(frozen=True)
class ForwardContext:
    rows: tuple[RowInfo, ...]  # one per batch row, in batch order
    # (batch, seq) bools for the input positions of this forward pass:
    generated_mask: torch.Tensor  # True where the input token was generated (not prompt)
    valid_mask: torch.Tensor  # False on padding positions


class ForwardInterceptor(Protocol):
    def set_context(self, context: ForwardContext | None) -> None:
        """Called before each forward pass (None: no batch context, e.g. a plain call)."""

    def collect(self) -> dict[str, Any]:
        """Called after each forward pass: request_id -> what was captured for that row."""
