"""Q4/Q8 on CPU with miLLM's own kernels or torch's (bitsandbytes stays for CUDA).

Every `nn.Linear` (and GPT-2-style `Conv1D`, a Linear with its weight stored transposed) whose
input width is a multiple of the group size (attention projections, MLP, and the LM head) is
replaced by a module that keeps only the quantized weight; its output is in the model's dtype, so
the residual stream (what the SAE reads and steering writes) stays as it was.

Q4 runs on miLLM's own W4A8 kernel where the CPU has AVX-512 VNNI (`engine/cpu_kernels.py`: int4
weights × activations rounded to int8 with a scale per 32 inputs, 2–3× faster than torch's, float32
out, a row's output independent of its batch), else on torch's `aten._weight_int4pack_mm_for_cpu`
(the layout torchao's int4 CPU path uses; activations cast to bfloat16 for the matmul, output rounded
to bfloat16). The quantized weights are the same: per output row
and group of G = 32 input columns, asymmetric min/max over the group,
    scale = (max - min) / 15,  q = round((w - min) / scale) ∈ [0, 15],  zero = min + 8 · scale,
    ŵ = (q - 8) · scale + zero,
stored in the kernel's layout (torch's: packed uint8 [N', K/2] plus bfloat16 (scale, zero) [K/G, N', 2];
miLLM's: see engine/cpu_kernels.py), where both kernels want N' a multiple of 16: extra rows are
zeros, and their outputs are cut off.

Q8 is W8A8 (int8 × int8 → int32: miLLM's AVX-512 VNNI kernel where the CPU has it, the same bits
as `torch._int_mm` 2–3× faster, else `torch._int_mm`): weights symmetric per output row,
scale = max|w| / 127, q = round(w / scale) ∈ [-127, 127], ŵ = q · scale (int8 [N, K] plus
bfloat16 scales [N]); activations quantized the same way per row (per token) on every call,
x̂ = round(x · 127 / max|x|) · max|x| / 127, and y = (x̂_int · q) · (max|x| / 127) · scale with the
integer products summed exactly. Every row's scale comes from that row alone, so a token's output
does not depend on the other rows of its batch (a per-tensor activation scale, as in fbgemm's
dynamic Linear, would make one request's text depend on concurrent traffic). The integer matmul
costs about 1.5–2.4× at 8 rows what it costs at one (torch's int4 with bf16 products ~3×), which is what
lets batching pay; at one row it reads twice Q4's weight bytes, so a single stream is a little
slower than Q4's (docs/benchmarks.md). `aten._weight_int8pack_mm`,
the weight-only int8 kernel used before, was 10× slower than float32 with float32 activations.

Siblings that read the same input (q/k/v projections; gate/up of a gated MLP) are fused into one
quantized matrix [N_q + N_k + N_v, K]: the first sibling called runs one matmul (one cast in, one
out) and the others take their column slices of its output. At one token per step on a small model
the per-call overhead is a large share of each matmul, so fewer, wider calls pay.
"""

from __future__ import annotations

import torch
from torch import nn

from engine import cpu_kernels

GROUP_SIZE = 32
_Q4_ROWS = 16  # the int4 packing needs a multiple of 16 output rows
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # HF Llama/Mistral/Qwen/Gemma names
KERNELS = {
    "q4": "torch int4 CPU kernel, group 32, bf16 activations",
    "q8": "W8A8 torch int8 matmul, per-row weight scales, per-token activation scales",
}


def kernel_name(quantization: str) -> str:
    """The kernel a CPU model quantized now runs, in words (Models page, /api/models)."""
    return cpu_kernels.NAMES[quantization] if uses_own_kernel(quantization) else KERNELS[quantization]


def uses_own_kernel(quantization: str) -> bool:
    """miLLM's kernels are single-threaded: with more than 2 torch threads torch's parallel ones are used."""
    return torch.get_num_threads() <= 2 and cpu_kernels.available(quantization)


class QuantizedLinear(nn.Module):
    """y = x ŵᵀ + b with ŵ stored quantized; `weight` dequantizes on access (for readers such as the
    feature lens, never the forward pass)."""

    def __init__(self, linear: nn.Linear | list[nn.Linear], quantization: str) -> None:
        super().__init__()
        linears = linear if isinstance(linear, list) else [linear]  # several: their rows stacked
        weight = torch.cat([_weight_of(part) for part in linears])
        self.out_features, self.in_features = weight.shape
        self.quantization = quantization
        if quantization == "q4":
            self.own_kernel = uses_own_kernel("q4")
            packed, scales_and_zeros = _quantize_q4(weight, own_kernel=self.own_kernel)
            # the kernel's own layout: torch's uint8 [N, K/2] + bf16 [K/G, N, 2], or engine/cpu_kernels.py's
            self.register_buffer("packed_weight", packed)
            self.register_buffer("scales_and_zeros", scales_and_zeros)
        else:
            self.own_kernel = uses_own_kernel("q8")
            q, scales = _quantize_q8(weight)
            if self.own_kernel:  # uint8 [N'/16, K/4, 16, 4] (engine/cpu_kernels.py), N' = N rounded up to 16
                padding = -q.shape[0] % cpu_kernels.COLUMNS
                q = cpu_kernels.pack_int8(torch.cat([q, q.new_zeros(padding, q.shape[1])]))
                scales = torch.cat([scales, scales.new_ones(padding)])
            self.register_buffer("int8_weight", q)  # int8 [N, K] for torch's kernel
            self.register_buffer("scales", scales)  # bf16 [N]
        biases = [part.bias for part in linears]
        self.bias = None if biases[0] is None else nn.Parameter(torch.cat([b.detach() for b in biases]), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """ŵ as float32 [N, K]: what the kernel multiplies by."""
        if self.quantization == "q8":
            q = cpu_kernels.unpack_int8(self.int8_weight) if self.own_kernel else self.int8_weight
            return (q.float() * self.scales.float().unsqueeze(1))[: self.out_features]
        if self.own_kernel:
            return cpu_kernels.unpack(self.packed_weight, self.scales_and_zeros)[: self.out_features]
        identity = torch.eye(self.in_features, dtype=torch.bfloat16)
        return self._int4_matmul(identity).float().T.contiguous()

    def _int4_matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.own_kernel:
            buffers = self._buffers  # not self.packed_weight: Module.__getattr__ costs ~1 µs a buffer, ~120 calls a step
            y = cpu_kernels.matmul(x, buffers["packed_weight"], buffers["scales_and_zeros"])
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed_weight, GROUP_SIZE,
                                                           self.scales_and_zeros)
        return y if y.shape[-1] == self.out_features else y[:, : self.out_features]

    def _int8_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """W8A8 with one activation scale per row, from that row alone (see the module docstring)."""
        if self.own_kernel:
            buffers = self._buffers
            y = cpu_kernels.matmul_int8(x, buffers["int8_weight"], buffers["scales"])
            return y if y.shape[-1] == self.out_features else y[:, : self.out_features]
        x = x.float()
        # 127 / max|x| of each row; x · that is within [-127, 127] up to a rounding, which round() absorbs
        inverse = 127 / x.abs().amax(-1, keepdim=True).clamp_(min=1e-30)
        q = (x * inverse).round_().to(torch.int8)
        # [N, K] weight passed transposed: faster than a [K, N] copy at one row, on par at eight
        return torch._int_mm(q, self.int8_weight.t()).div(inverse).mul_(self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The no-op reshapes and casts are skipped, not run: at one token a step they cost a third of the kernel.
        flat = x if x.dim() == 2 and x.shape[1] == self.in_features else x.reshape(-1, self.in_features)
        y = self._int4_matmul(flat) if self.quantization == "q4" else self._int8_matmul(flat)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if x.dim() != 2:
            y = y.reshape(*x.shape[:-1], self.out_features)
        bias = self._parameters.get("bias")
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.quantization}"


class _SharedOutput:
    """The fused product of the last input, kept until every sibling has taken its slice."""

    def __init__(self, fused: QuantizedLinear, parts: int) -> None:
        self.fused, self.parts = fused, parts
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.pending: set[int] = set()

    def take(self, part: int, x: torch.Tensor) -> torch.Tensor:
        if self.input is not x or part not in self.pending:  # a new input (or a repeat): compute once more
            self.input, self.output, self.pending = x, self.fused(x), set(range(self.parts))
        self.pending.discard(part)
        output = self.output
        if not self.pending:  # all siblings served: let go of the tensors
            self.input = self.output = None
        assert output is not None
        return output


class FusedSlice(nn.Module):
    """One sibling of a fused group: columns [start, stop) of the group's output for the same input."""

    def __init__(self, shared: _SharedOutput, part: int, start: int, stop: int) -> None:
        super().__init__()
        self.fused = shared.fused  # a submodule, so parameters(), buffers() and .to() see the weights
        self._shared, self.part, self.start, self.stop = shared, part, start, stop
        self.in_features, self.out_features = shared.fused.in_features, stop - start

    @property
    def weight(self) -> torch.Tensor:
        return self.fused.weight[self.start : self.stop]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._shared.take(self.part, x)[..., self.start : self.stop]

    def extra_repr(self) -> str:
        return f"rows {self.start}:{self.stop} of a fused {self.fused.quantization} group"


def _quantize_q4(weight: torch.Tensor, *, own_kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    padding = -weight.shape[0] % _Q4_ROWS
    if padding:
        weight = torch.cat([weight, weight.new_zeros(padding, weight.shape[1])])
    n, k = weight.shape
    groups = weight.reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-6).to(torch.bfloat16).float()  # the kernel reads bf16
    zero = (low + 8 * scale).to(torch.bfloat16).float()
    q = ((groups - zero) / scale + 8).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    if own_kernel:
        return cpu_kernels.pack(q, scale.squeeze(-1), zero.squeeze(-1))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, scales_and_zeros


def _quantize_q8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-8).to(torch.bfloat16)
    q = (weight / scale.float().unsqueeze(1)).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # transformers.pytorch_utils.Conv1D


def _weight_of(module: nn.Module) -> torch.Tensor:
    """The [out, in] float32 weight of a Linear or a Conv1D (which stores [in, out])."""
    weight = module.weight.detach().float()
    return weight.T if _is_conv1d(module) else weight


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a quantizable module."""
    rows, columns = module.weight.shape
    return (columns, rows) if _is_conv1d(module) else (rows, columns)


def quantizable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return module.in_features % GROUP_SIZE == 0
    return _is_conv1d(module) and module.weight.shape[0] % GROUP_SIZE == 0


def quantize_for_cpu(model: nn.Module, quantization: str) -> int:
    """Replace the model's quantizable Linear layers in place; returns how many were replaced.

    A Linear tied to the input embedding (the LM head of most small models) is replaced too: the
    embedding keeps its own float weight, the head multiplies by the quantized copy. (HF's
    `tie_weights()` must not run afterwards; nothing here calls it once a model is loaded.)
    """
    replaced = 0
    for parent in list(model.modules()):
        for names in SIBLINGS:
            group = [getattr(parent, name, None) for name in names]
            if all(quantizable(c) for c in group) and _fusable(group):
                shared = _SharedOutput(QuantizedLinear(group, quantization), len(group))
                start = 0
                for part, (name, child) in enumerate(zip(names, group, strict=True)):
                    setattr(parent, name, FusedSlice(shared, part, start, start + child.out_features))
                    start += child.out_features
                replaced += len(group)
        for name, child in list(parent.named_children()):
            if quantizable(child):
                setattr(parent, name, QuantizedLinear(child, quantization))
                replaced += 1
    return replaced


def _fusable(group: list[nn.Linear]) -> bool:
    return len({_weight_of(c).shape[1] for c in group}) == 1 and len({c.bias is None for c in group}) == 1
