"""A model's decode step on miLLM's CPU kernels (engine/cpu_kernels.py), beyond the Q4/Q8 matmuls.

- **Attention** (`millm_cpu`, registered with transformers): one query token per row on
  `engine/kernels/avx512_attention.c`. torch's CPU `scaled_dot_product_attention` runs a blocked
  flash-attention kernel made for many query tokens: on 8 SmolLM2 rows of 160 tokens it took ~300 µs
  a layer (~9 ms of a ~40 ms Q4 step) where one row took ~20 µs, the cost that kept 8 Q4 streams under
  4× one stream; the kernel does the same math (GQA, padding and sliding-window masks, float32) ~4×
  faster, and a row's result does not depend on the padding its batch gives it. Prefill, other
  dtypes and devices, and options the kernel does not compute (soft-capping, sinks, a float mask, a
  position bias) go to transformers' sdpa unchanged; the masks are sdpa's.
- **RMSNorm** (Llama, Mistral, Qwen2/3 norms): one call instead of 7 torch ops, ~60 times a step.
- **Rotary embedding** (the same model families): one call per tensor instead of ~7 ops, with the
  bits of transformers' formula (same float32 multiplications and addition), so it is installed for
  the whole modeling module once and changes nothing for other models that use it.
- **The gated MLP's activation** (the same families, when gate and up are one fused Q4/Q8 matmul):
  silu(gate) · up in one call on the fused output instead of two slices, a SiLU and a product, 30
  times a step (its exponential is a polynomial within 2 ulp of torch's, not the same bits).

`use_cpu_kernels(model)` switches a model on; the loader does it only for models already on miLLM's
Q4/Q8 kernels, whose numbers differ from the float32 reference anyway: a float32 model keeps
transformers' sdpa and norms, bit for bit equal to its own `generate()`.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from engine import cpu_kernels
from engine.quantization import FusedSlice

NAME = "millm_cpu"
LABEL = "miLLM AVX-512 decode attention, RMSNorm, rotary and SiLU·mul"
_SDPA_ONLY = ("softcap", "s_aux", "sinks", "position_bias")  # options the attention kernel does not compute
# Norms computing weight · x / √(mean(x²) + eps) with `weight` and `variance_epsilon` (not Gemma's 1 + weight)
_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
# MLPs computing down_proj(act_fn(gate_proj(x)) * up_proj(x))
_GATED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
_SILU = frozenset({"SiLU", "SiLUActivation"})
# Modeling modules whose apply_rotary_pos_emb is Llama's (rotate_half over the two halves)
_ROTARY_MODULES = ("llama", "mistral", "qwen2", "qwen3")


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


def use_cpu_kernels(model: Any) -> bool:
    """Switch a CPU model on sdpa to miLLM's decode attention, norms and rotary; whether it did."""
    if model.device.type != "cpu" or getattr(model.config, "_attn_implementation", None) != "sdpa" \
            or not cpu_kernels.available("attention") or not cpu_kernels.available("layers"):
        return False  # eager, flex, ...: the model asked for something else
    model.set_attn_implementation(NAME)
    for module in model.modules():
        if type(module).__name__ in _NORMS and isinstance(getattr(module, "variance_epsilon", None), float):
            module.forward = _norm_forward(module)
        elif type(module).__name__ in _GATED_MLPS and _fused_gate_and_up(module):
            module.forward = _mlp_forward(module)
    modeling = importlib.import_module(type(model).__module__)
    if modeling.__name__.rsplit(".", 1)[-1] in {f"modeling_{name}" for name in _ROTARY_MODULES}:
        _install_rotary(modeling)
    return True


def _norm_forward(module: torch.nn.Module) -> Any:
    original = module.forward

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        out = cpu_kernels.rms_norm(hidden_states, module.weight, module.variance_epsilon)
        return out if out is not None else original(hidden_states)

    return forward


def _fused_gate_and_up(module: torch.nn.Module) -> bool:
    gate, up = getattr(module, "gate_proj", None), getattr(module, "up_proj", None)
    return isinstance(gate, FusedSlice) and isinstance(up, FusedSlice) and gate.fused is up.fused \
        and type(getattr(module, "act_fn", None)).__name__ in _SILU and hasattr(module, "down_proj")


def _mlp_forward(module: torch.nn.Module) -> Any:
    original, gate, up = module.forward, module.gate_proj, module.up_proj

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.device.type == "cpu":
            hidden = cpu_kernels.silu_mul(gate.fused(x), gate.start, up.start, gate.out_features)
            if hidden is not None:
                return module.down_proj(hidden)
        return original(x)

    return forward


def _install_rotary(modeling: Any) -> None:
    original = modeling.apply_rotary_pos_emb
    if getattr(original, "millm_kernel", False):
        return

    def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        if unsqueeze_dim == 1 and q.dim() == 4 and q.shape[2] == 1:
            q_embed, k_embed = cpu_kernels.rotary(q, cos, sin), cpu_kernels.rotary(k, cos, sin)
            if q_embed is not None and k_embed is not None:
                return q_embed, k_embed
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.millm_kernel = True  # type: ignore[attr-defined]
    apply_rotary_pos_emb.original = original  # type: ignore[attr-defined]
    modeling.apply_rotary_pos_emb = apply_rotary_pos_emb
