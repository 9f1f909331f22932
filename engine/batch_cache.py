"""The KV cache of a running decode batch whose rows join and leave between steps.

Layout: every row is right-aligned in one padded width W (left padding). Row r holds
`W - pads[r]` real tokens in the last columns; the attention mask is 0 on its first `pads[r]`
columns and its next position id is `W - pads[r]`, so each row computes exactly what it would alone
(padding keys are masked out and RoPE sees the row's own positions). Every decode step appends one
column to all rows, so the right alignment holds without moving anything.

- join: a freshly prefilled group (itself left-padded) is concatenated on the batch dimension after
  left-padding whichever side is narrower; padded K/V columns are zeros (finite, and masked).
- leave: rows are index-selected out, then the leading columns that are padding in every remaining
  row are cut, so a long prompt that finished does not keep costing attention over its width.

This keeps the model's own DynamicCache and attention path (any HF decoder with full or sliding
window attention layers), at the price of one cache copy when the batch changes, not per step.
Full-attention layers are `PreallocatedLayer`s: their K/V live in a buffer with room for more columns,
so a decode step writes its one column in place instead of `torch.cat` copying the whole cache (on
8 rows of SmolLM2 that copy was ~4 ms of a ~60 ms step, and it grows with the context).
Sliding-window layers store only the last `window - 1` columns; the same rules apply to them with
stored width min(W, window - 1).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from engine.loading import UnsupportedModelError

_SUPPORTED_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)


def new_cache(config: Any, *, preallocated: bool = True) -> DynamicCache:
    cache = DynamicCache(config=config)
    if not preallocated:  # the model's own cache (the reference the preallocated one must equal)
        return cache
    cache.layers = [PreallocatedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views of the first `length` columns of larger buffers.

    `update` writes the new columns in place (growing the buffer by a quarter, at least 64 columns,
    when full); assigning `keys`/`values` (merge, select, crop) copies into a fresh buffer with
    headroom. Same values as DynamicLayer's, bit for bit: only the storage differs.
    """

    HEADROOM = 64  # columns: at least this many decode steps between buffer growths

    def __init__(self, **kwargs: Any) -> None:
        self._buffers: dict[str, torch.Tensor | None] = {"keys": None, "values": None}
        self._raw: dict[str, torch.Tensor | None] = {"keys": None, "values": None}
        self._lengths = {"keys": 0, "values": 0}  # apart: merge/select assign keys before reading values
        super().__init__(**kwargs)

    def _get(self, name: str) -> torch.Tensor | None:
        buffer = self._buffers[name]
        return self._raw[name] if buffer is None else buffer[:, :, : self._lengths[name]]

    def _set(self, name: str, tensor: torch.Tensor | None) -> None:
        if tensor is None or tensor.dim() != 4:  # None, or DynamicLayer's empty placeholder
            self._buffers[name], self._raw[name], self._lengths[name] = None, tensor, 0
            return
        length = tensor.shape[-2]
        buffer = tensor.new_empty(*tensor.shape[:2], _capacity(length), tensor.shape[-1])
        buffer[:, :, :length] = tensor
        self._buffers[name], self._raw[name], self._lengths[name] = buffer, None, length

    keys = property(lambda self: self._get("keys"), lambda self, t: self._set("keys", t))  # type: ignore[assignment]
    values = property(lambda self: self._get("values"), lambda self, t: self._set("values", t))  # type: ignore[assignment]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self._buffers["keys"], self._buffers["values"]
        if keys is None or values is None:  # the first states: they become the buffers' first columns
            self._set("values", value_states)
            self._set("keys", key_states)
            return self.keys, self.values  # type: ignore[return-value]
        start, added = self._lengths["keys"], key_states.shape[-2]
        if start + added > keys.shape[-2]:
            keys, values = _grown(keys, start, start + added), _grown(values, start, start + added)
            self._buffers["keys"], self._buffers["values"] = keys, values
        keys[:, :, start : start + added] = key_states
        values[:, :, start : start + added] = value_states
        self._lengths["keys"] = self._lengths["values"] = length = start + added
        return keys[:, :, :length], values[:, :, :length]


def _grown(buffer: torch.Tensor, used: int, needed: int) -> torch.Tensor:
    grown = buffer.new_empty(*buffer.shape[:2], _capacity(needed), buffer.shape[-1])
    grown[:, :, :used] = buffer[:, :, :used]
    return grown


def _capacity(length: int) -> int:
    return length + max(PreallocatedLayer.HEADROOM, length // 4)


def check_cache_support(config: Any) -> None:
    """Raise UnsupportedModelError for models whose cache rows cannot be merged (recurrent state, ...)."""
    for layer in DynamicCache(config=config).layers:
        if type(layer) not in _SUPPORTED_LAYERS:
            raise UnsupportedModelError(
                f"continuous batching supports attention KV caches only; this model's cache has "
                f"{type(layer).__name__} layers"
            )


class BatchKVCache:
    def __init__(self, cache: DynamicCache, pads: list[int], width: int, device: torch.device) -> None:
        self.cache = cache
        self.pads = pads  # per row: leading padding columns (host copy, no device sync needed)
        self.width = width
        self.device = device
        self._refresh()

    @property
    def batch_size(self) -> int:
        return len(self.pads)

    def _refresh(self) -> None:
        """Rebuild the per-row tensors after the rows or the width changed (not per step)."""
        self._pads_t = torch.tensor(self.pads, dtype=torch.long, device=self.device)
        self._unpadded = max(self.pads, default=0) == 0
        columns = torch.arange(self.width, device=self.device)
        self.attention_mask = (columns.unsqueeze(0) >= self._pads_t.unsqueeze(1)).long()
        self._ones = torch.ones((len(self.pads), 1), dtype=torch.long, device=self.device)

    def decode_inputs(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(attention mask over width + 1, position ids (B, 1)) for the next one-token step.

        No row padded (a single stream, or rows of one width): the mask is all ones, and the model
        would find that out itself each step (`mask.all()`, a host sync, then it drops the mask);
        None says so without building it. The stored mask catches up when rows change (_refresh).
        """
        positions = (self.width - self._pads_t).unsqueeze(1)
        if self._unpadded:
            return None, positions
        return torch.cat([self.attention_mask, self._ones], dim=1), positions

    def commit_step(self, mask: torch.Tensor | None) -> None:
        """The step's forward pass appended one column to every layer."""
        if mask is not None:
            self.attention_mask = mask
        self.width += 1

    def merge(self, other: BatchKVCache) -> None:
        """Append other's rows after this batch's rows."""
        width = max(self.width, other.width)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            if not mine.is_initialized or not theirs.is_initialized:
                continue  # layers that share another layer's KV hold nothing themselves
            stored = max(mine.keys.shape[-2], theirs.keys.shape[-2])
            mine.keys = torch.cat([_left_pad(mine.keys, stored), _left_pad(theirs.keys, stored)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, stored), _left_pad(theirs.values, stored)], dim=0)
            if isinstance(mine, DynamicSlidingWindowLayer):
                mine.cumulative_length = width
        self.pads = [p + width - self.width for p in self.pads] + [
            p + width - other.width for p in other.pads
        ]
        self.width = width
        self._refresh()

    def select(self, keep: list[int]) -> None:
        """Keep only these rows (in this order) and cut the columns that became padding everywhere."""
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        pads = [self.pads[i] for i in keep]
        cut = min(pads)
        width = self.width - cut
        for layer in self.cache.layers:
            if not layer.is_initialized:
                continue
            stored = layer.keys.shape[-2]
            drop = stored - min(stored, width)
            layer.keys = layer.keys.index_select(0, index)[:, :, drop:]
            layer.values = layer.values.index_select(0, index)[:, :, drop:]
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer.cumulative_length = width
        self.pads = [p - cut for p in pads]
        self.width = width
        self._refresh()


def _left_pad(states: torch.Tensor, stored: int) -> torch.Tensor:
    missing = stored - states.shape[-2]
    return F.pad(states, (0, 0, missing, 0)) if missing else states
