"""miLLM's own AVX-512 CPU kernels, one thread: the Q4 and Q8 matmuls and a decode step's attention, norms, rotary.

Q4: 4-bit weights × int8 activations with a scale per 32 inputs (W4A8).

torch's `_weight_int4pack_mm_for_cpu` unpacks the weights again for every tile of 4 rows and rounds
its output to bfloat16; at one row it spent ~13 ms of a ~30 ms SmolLM2 decode step, and from 1 to 8
rows its cost tripled, which is why 8 Q4 streams could not reach 4× one stream. This kernel
(`engine/kernels/avx512_matmul.c`, the layout and the math in its header) unpacks a block once for up
to 8 rows and multiplies nibbles by int8 activations with `vpdpbusd`, 64 multiply-adds an instruction
(twice bfloat16's `vdpbf16ps`, which the first version used), and writes float32: ~2.5× torch's at
one row, ~3.5× at eight (docs/benchmarks.md). A scale per 32 inputs keeps the activations' rounding
small (the demo SAE's FVU on Q4 is float32's + 0.0004; one scale per row gave + 0.008), and a row's
output does not depend on what else is in its batch.

Q8 (W8A8, the math of engine/quantization.py) on `vpdpbusd`: the same integer sums and the same
float operations as `torch._int_mm(...).div(inverse).mul_(scale)`, so the same bits, without the
torch calls around it and with the weights read once for up to 8 rows.

Decode attention (one query token per row, `engine/kernels/avx512_attention.c`), RMSNorm, rotary and
the gated MLP's SiLU·mul (`engine/kernels/avx512_layers.c`), installed on a model by
engine/decode_kernels.py: torch's CPU sdpa is built for many query tokens and cost ~300 µs a layer at 8
rows, ~4× the kernel; the norm, the rotary and the SiLU·mul are one call each instead of 4–14 torch ops.
Greedy sampling's argmax (engine/sampling.py) runs here too once the kernels are built: torch's took
~75 µs a row of a 49k vocabulary, ~0.6 ms of an 8-row step.

The files are compiled on first use with the system C compiler (`cc`, or `$CC`) into a cache folder
(`MILLM_KERNEL_CACHE`, default `~/.cache/millm/kernels`), keyed by the source and the flags, and
loaded with ctypes (which releases the GIL during the call). Where the CPU lacks AVX-512 VNNI (Q4,
Q8), no compiler is found, or `MILLM_CPU_KERNELS=torch`, `available(kernel)` is False and
torch's kernels (and sdpa) run, as before.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

KERNELS = Path(__file__).resolve().parent / "kernels"
SOURCES = (KERNELS / "avx512_matmul.c", KERNELS / "avx512_attention.c", KERNELS / "avx512_layers.c")
HEADERS = (KERNELS / "avx512_exp.h",)  # included by the sources: part of the build's key
FLAGS = ("-O3", "-ffp-contract=off", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
         "-mfma", "-shared", "-fPIC")
CPU_FLAGS = {"q4": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
             "q8": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
             "attention": ("avx512f", "avx512bw", "avx512vl"), "layers": ("avx512f",)}
COLUMNS = 16  # output columns per block
GROUP = 32
_loaded = False  # set once _library() has built and loaded the kernels in this process
NAMES = {"q4": "miLLM W4A8 AVX-512 VNNI kernel, group 32, int8 activations per 32 inputs",
         "q8": "miLLM W8A8 AVX-512 VNNI kernel, per-row weight scales, per-token activation scales"}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cache_dir() -> Path:
    configured = os.environ.get("MILLM_KERNEL_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "millm" / "kernels"


@cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("MILLM_CPU_KERNELS", "auto").lower() == "torch":
        return None
    if "avx512f" not in _cpu_flags():
        logger.info("CPU kernels: the CPU has no AVX-512; Q4/Q8 use torch's kernels")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("CPU kernels: no C compiler (cc/gcc) found; Q4/Q8 use torch's slower kernels")
        return None
    source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    digest = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"avx512_kernels-{digest}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                subprocess.run([compiler, *FLAGS, "-o", str(built), *map(str, SOURCES), "-lm"], check=True,
                               capture_output=True, timeout=120)
                os.replace(built, target)  # atomic: a concurrent build never loads half a file
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        logger.warning("CPU kernels: build failed (%s %s); Q4/Q8 use torch's kernels", type(exc).__name__,
                       detail.decode(errors="replace")[-300:])
        return None
    p, n = ctypes.c_void_p, ctypes.c_long
    library.millm_int4_matmul.argtypes = [p, n, n, p, p, n, p]
    library.millm_int8_matmul.argtypes = [p, n, n, p, p, n, p]
    library.millm_decode_attention.argtypes = [p, n, n, n, n, n, p, n, n, p, n, n, p, n, ctypes.c_float, p]
    for kernel in (library.millm_int4_matmul, library.millm_int8_matmul, library.millm_decode_attention):
        kernel.restype = ctypes.c_int
    library.millm_rms_norm.argtypes = [p, n, n, n, p, ctypes.c_float, p]
    library.millm_rotary.argtypes = [p, n, n, n, n, n, p, p, p]
    library.millm_rms_norm.restype = library.millm_rotary.restype = None
    library.millm_silu_mul.argtypes = [p, n, n, n, n, n, p]
    library.millm_silu_mul.restype = None
    library.millm_argmax.argtypes = [p, n, n, n, p]
    library.millm_argmax.restype = ctypes.c_int
    global _loaded
    _loaded = True
    return library


def available(kernel: str = "q4") -> bool:
    """Whether miLLM's kernel for `kernel` ("q4", "q8", "attention") can run on this CPU (else torch's)."""
    flags = _cpu_flags()
    return all(flag in flags for flag in CPU_FLAGS[kernel]) and _library() is not None


def pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q int [N, K] in 0..15, scale/zero [N, K/32] (bfloat16 values; N a multiple of 16) → the kernel's
    (packed uint8 [N/16, K/32, 4, 64], scales_and_zeros bfloat16 [N/16, K/32, 2, 16])."""
    n, k = q.shape
    blocks, groups = n // COLUMNS, k // GROUP
    nibbles = q.to(torch.uint8).reshape(blocks, COLUMNS, groups, 4, 2, 4)  # [b, c, g, chunk, low/high, e]
    packed = (nibbles[..., 0, :] | (nibbles[..., 1, :] << 4)).permute(0, 2, 3, 1, 4)  # [b, g, chunk, c, e]
    per_block = torch.stack([scale, zero]).to(torch.bfloat16).reshape(2, blocks, COLUMNS, groups)
    return packed.reshape(blocks, groups, 4, 64).contiguous(), per_block.permute(1, 3, 0, 2).contiguous()


def unpack(packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """ŵ float32 [N, K] = (q − 8) · scale + zero, from the kernel's layout."""
    blocks, groups = packed.shape[:2]
    bytes_ = packed.reshape(blocks, groups, 4, COLUMNS, 1, 4)
    q = torch.cat([bytes_ & 0x0F, bytes_ >> 4], dim=4).float()  # [b, g, chunk, c, low/high, e]
    q = q.permute(0, 3, 1, 2, 4, 5).reshape(blocks * COLUMNS, groups, GROUP)
    scale, zero = scales_and_zeros.float().permute(2, 0, 3, 1).reshape(2, blocks * COLUMNS, groups, 1)
    return ((q - 8) * scale + zero).reshape(blocks * COLUMNS, groups * GROUP)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x float32 [M, K] as the Q4 kernel multiplies it: int8 per group of 32 inputs, returned dequantized
    (q · step, float64), for tests and benchmarks that check the kernel against exact math."""
    rows, k = x.shape
    groups = x.float().reshape(rows, k // GROUP, GROUP)
    top = groups.abs().amax(-1, keepdim=True).clamp(min=1e-30)
    q = (groups * ((1.0 / top) * 127)).round()
    return (q.double() * (top / 127).double()).reshape(rows, k)


def _call(kernel: str, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y float32 [M, N] = kernel(x [M, K], packed weights, their scales); N = 16 · the packed blocks.
    Runs ~120 times a decode step, at ~5 µs of kernel a call for one row: each torch call it skips counts."""
    library = _library()
    assert library is not None, "CPU kernels not available"
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    rows, k = x.shape
    n = packed.shape[0] * COLUMNS
    y = torch.empty(rows, n)
    if rows and getattr(library, kernel)(x.data_ptr(), rows, k, packed.data_ptr(), scales.data_ptr(), n,
                                         y.data_ptr()) != 0:
        raise MemoryError(f"{kernel}: could not allocate its scratch")
    return y


def matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """Q4: x [M, K] (any float dtype) · ŵᵀ → float32 [M, N] (N as packed, a multiple of 16)."""
    return _call("millm_int4_matmul", x, packed, scales_and_zeros)


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 weights [N, K] (N a multiple of 16, K of 4) → uint8 q + 128 as [N/16, K/4, 16, 4]."""
    n, k = q.shape
    shifted = (q.to(torch.int16) + 128).to(torch.uint8)
    return shifted.reshape(n // COLUMNS, COLUMNS, k // 4, 4).permute(0, 2, 1, 3).contiguous()


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    """The int8 weights [N, K] back from pack_int8's layout."""
    blocks, quads = packed.shape[:2]
    return (packed.permute(0, 2, 1, 3).reshape(blocks * COLUMNS, quads * 4).to(torch.int16) - 128).to(torch.int8)


def matmul_int8(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W8A8 of x [M, K] by the packed int8 weights, scales bfloat16 [N] → float32 [M, N]."""
    return _call("millm_int8_matmul", x, packed, scales)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor | None:
    """Attention of one query token per row: query [B, H, 1, D], key/value [B, KVH, L, D] float32 on the CPU
    (rows of D contiguous floats, any batch/head strides), mask None or bool [B or 1, 1, 1, L] (True =
    attended) → [B, 1, H, D], the layout attention functions return. None where the kernel does not apply
    (the caller runs torch's sdpa instead). Runs 30 times a decode step: the checks are kept cheap."""
    library = _library()
    batch, heads, tokens, dim = query.shape
    if library is None or tokens != 1 or key.dim() != 4 or value.shape != key.shape:
        return None
    key_batch, kv_heads, length, key_dim = key.shape
    if key_batch != batch or key_dim != dim or dim % 16 or dim > 256 or heads % kv_heads:
        return None
    if query.dtype != torch.float32 or key.dtype != torch.float32 or value.dtype != torch.float32 \
            or query.device.type != "cpu" or key.device.type != "cpu" or value.device.type != "cpu":
        return None
    key_strides, value_strides = key.stride(), value.stride()
    if key_strides[2:] != (dim, 1) or value_strides[2:] != (dim, 1):
        return None
    mask_pointer, mask_stride = None, 0
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape[1:] != (1, 1, length) or mask.shape[0] not in (1, batch):
            return None
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
        mask_pointer, mask_stride = mask.data_ptr(), mask.stride(0) if mask.shape[0] == batch else 0
    query = query.contiguous()  # one token: rotary's [B, H, 1, D] view of [B, 1, H, D] already is, no copy
    out = torch.empty(batch, 1, heads, dim)
    if batch and library.millm_decode_attention(
            query.data_ptr(), batch, heads, kv_heads, length, dim, key.data_ptr(), key_strides[0], key_strides[1],
            value.data_ptr(), value_strides[0], value_strides[1], mask_pointer, mask_stride, scale,
            out.data_ptr()) != 0:
        raise MemoryError("millm_decode_attention: could not allocate its scratch")
    return out


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int] | None:
    """x as rows of its last dimension for a kernel that reads rows `row_stride` floats apart: (x as
    [rows, features], rows, row_stride); None where the rows overlap (the caller runs torch's)."""
    features = x.shape[-1]
    rows = x.numel() // features if features else 0
    flat = x if x.dim() == 2 else x.reshape(rows, features)
    if rows > 1 and flat.stride(0) < features:
        return None
    return flat, rows, flat.stride(0) if rows > 1 else features


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """weight · x / √(mean(x²) + eps) over the last dimension, float32 on the CPU, rows with contiguous
    features (any row stride); None where that does not hold (the caller runs the module's own forward)."""
    library = _library()
    dim = x.shape[-1]
    if library is None or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu" \
            or weight.shape != (dim,) or x.stride(-1) != 1 or not weight.is_contiguous() or (layout := _rows(x)) is None:
        return None
    flat, rows, row_stride = layout
    out = torch.empty(x.shape)
    if rows:
        library.millm_rms_norm(flat.data_ptr(), rows, row_stride, dim, weight.data_ptr(), eps, out.data_ptr())
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """x · cos + rotate_half(x) · sin for one token per row: x [B, H, 1, D] float32 (features contiguous,
    any batch/head strides), cos/sin [B, 1, D] → a new [B, H, 1, D]; the bits of transformers' formula.
    None where the kernel does not apply."""
    library = _library()
    if library is None or x.dim() != 4 or x.shape[2] != 1 or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    batch, heads, _, dim = x.shape
    if dim % 2 or x.stride(-1) != 1 or cos.shape != (batch, 1, dim) or sin.shape != (batch, 1, dim) \
            or cos.dtype != torch.float32 or sin.dtype != torch.float32:
        return None
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(batch, heads, 1, dim)
    if batch and heads:
        library.millm_rotary(x.data_ptr(), batch, heads, x.stride(0), x.stride(1), dim, cos.data_ptr(),
                             sin.data_ptr(), out.data_ptr())
    return out


def silu_mul(x: torch.Tensor, gate: int, up: int, width: int) -> torch.Tensor | None:
    """silu(x[..., gate:gate + width]) · x[..., up:up + width] of a fused gate/up output, float32 on the CPU
    with contiguous features (any row stride) → a new [..., width]; None where that does not hold."""
    library = _library()
    features = x.shape[-1] if x.dim() else 0
    if library is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.stride(-1) != 1 \
            or min(gate, up) < 0 or max(gate, up) + width > features or width <= 0 or (layout := _rows(x)) is None:
        return None
    flat, rows, row_stride = layout
    out = torch.empty(*x.shape[:-1], width)
    if rows:
        library.millm_silu_mul(flat.data_ptr(), rows, row_stride, gate, up, width, out.data_ptr())
    return out


def built() -> bool:
    """Whether the kernels are already compiled and loaded in this process (by a model on them): the
    sampler uses them then, and never makes a float32 model wait for the ~5 s build."""
    return _loaded and _library() is not None


def argmax(x: torch.Tensor) -> torch.Tensor | None:
    """torch.argmax(x, dim=-1) of float32 CPU logits [B, V] (features contiguous, any row stride), the same
    indices ~10× faster at 8 rows of a 49k vocabulary; None where that does not hold or a row holds a NaN
    (the caller runs torch's)."""
    library = _library()
    if library is None or x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[1] == 0 \
            or x.stride(1) != 1 or (layout := _rows(x)) is None:
        return None
    _, rows, row_stride = layout
    out = torch.empty(rows, dtype=torch.long)
    if rows and library.millm_argmax(x.data_ptr(), rows, row_stride, x.shape[1], out.data_ptr()):
        return None
    return out
