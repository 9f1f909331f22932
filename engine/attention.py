"""miLLM's one-token attention kernel on CPU, plugged into transformers as the attention `millm_cpu`.

A decode step asks every layer's attention for one query token per row. torch's CPU
`scaled_dot_product_attention` runs a blocked flash-attention kernel made for many query tokens: on 8
SmolLM2 rows of 160 tokens it took ~300 µs a layer, ~9 ms of a ~32 ms Q4 step, while one row took
~20 µs. That cost growing with the batch is what kept 8 Q4 streams under 4× one stream.
`engine/kernels/avx512_attention.c` does the same math (GQA, a padding or sliding-window mask, float32)
in ~10× less time, and a row's result does not depend on the padding its batch gives it.

`millm_cpu` is transformers' "sdpa" with that kernel for one-token steps: prefill, other dtypes and
devices, and any option the kernel does not cover (soft-capping, attention sinks, a float mask, a
position bias) go to the sdpa function unchanged. Its masks are sdpa's. It is switched on only where
the numbers already differ from the float32 reference (models on miLLM's Q4/Q8 CPU kernels), so the
float32 path stays bit-identical to transformers' own `generate()`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from engine import cpu_kernels

NAME = "millm_cpu"
LABEL = "miLLM AVX-512 decode attention"
_SDPA_ONLY = ("softcap", "s_aux", "sinks", "position_bias")  # options the kernel does not compute


def millm_cpu_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    if query.shape[2] == 1 and not dropout and all(kwargs.get(name) is None for name in _SDPA_ONLY):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = cpu_kernels.decode_attention(query, key, value, attention_mask, scale)
        if out is not None:
            return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


AttentionInterface.register(NAME, millm_cpu_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_decode_kernel(model: Any) -> bool:
    """Switch a CPU model that runs on sdpa to `millm_cpu`, where the kernel can run; whether it did."""
    if not cpu_kernels.available("attention") or model.device.type != "cpu":
        return False
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False  # eager, flex, ...: the model asked for something else
    model.set_attn_implementation(NAME)
    return True
