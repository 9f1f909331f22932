"""miLLM's own Q4 and Q8 CPU matmuls on AVX-512 (BF16 for Q4, VNNI for Q8), one thread.

Q4: 4-bit weights × bfloat16 activations.

torch's `_weight_int4pack_mm_for_cpu` unpacks the weights again for every tile of 4 rows and rounds
its output to bfloat16; at one row it spent ~13 ms of a ~30 ms SmolLM2 decode step, and from 1 to 8
rows its cost tripled, which is why 8 Q4 streams could not reach 4× one stream. This kernel
(`engine/kernels/avx512_matmul.c`, the layout and the math in its header) unpacks a block once for up
to 8 rows, multiplies with `vdpbf16ps` and writes float32: 2.4–3× faster than torch's at one row
and at eight (docs/benchmarks.md), the same quantized weights, and a row's output does not depend
on what else is in its batch.

Q8 (W8A8, the math of engine/quantization.py) on `vpdpbusd`: the same integer sums and the same
float operations as `torch._int_mm(...).div(inverse).mul_(scale)`, so the same bits, without the
torch calls around it and with the weights read once for up to 8 rows.

The file is compiled on first use with the system C compiler (`cc`, or `$CC`) into a cache folder
(`MILLM_KERNEL_CACHE`, default `~/.cache/millm/kernels`), keyed by the source and the flags, and
loaded with ctypes (which releases the GIL during the call). Where the CPU lacks AVX-512 BF16 (Q4)
or VNNI (Q8), no compiler is found, or `MILLM_CPU_KERNELS=torch`, `available(quantization)` is
False and torch's kernels run, as before.
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

SOURCE = Path(__file__).resolve().parent / "kernels" / "avx512_matmul.c"
FLAGS = ("-O3", "-ffp-contract=off", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni",
         "-mfma", "-shared", "-fPIC")
CPU_FLAGS = {"q4": ("avx512f", "avx512bw", "avx512vl", "avx512_bf16"),
             "q8": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")}
COLUMNS = 16  # output columns per block
GROUP = 32
NAMES = {"q4": "miLLM int4 AVX-512 BF16 kernel, group 32, bf16 activations",
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
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"avx512_matmul-{digest}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE), "-lm"], check=True,
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
    library.millm_int4_matmul.restype = library.millm_int8_matmul.restype = ctypes.c_int
    return library


def available(quantization: str = "q4") -> bool:
    """Whether `quantization` ("q4"/"q8") on this CPU runs on miLLM's kernel (else on torch's)."""
    flags = _cpu_flags()
    return all(flag in flags for flag in CPU_FLAGS[quantization]) and _library() is not None


def pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q int [N, K] in 0..15, scale/zero [N, K/32] (bfloat16 values; N a multiple of 16) → the kernel's
    (packed uint8 [N/16, K/32, 8, 32], scales_and_zeros bfloat16 [N/16, K/32, 2, 16])."""
    n, k = q.shape
    blocks, groups = n // COLUMNS, k // GROUP
    quads = q.to(torch.uint8).reshape(blocks, COLUMNS, groups, 8, 4).permute(0, 2, 3, 1, 4)  # [b, g, quad, c, 4]
    packed = (quads[..., 0:2] | (quads[..., 2:4] << 4)).reshape(blocks, groups, 8, 32).contiguous()
    per_block = torch.stack([scale, zero]).to(torch.bfloat16).reshape(2, blocks, COLUMNS, groups)
    return packed, per_block.permute(1, 3, 0, 2).contiguous()


def unpack(packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """ŵ float32 [N, K] = (q − 8) · scale + zero, from the kernel's layout."""
    blocks, groups = packed.shape[:2]
    pairs = packed.reshape(blocks, groups, 8, COLUMNS, 2)
    q = torch.cat([pairs & 0x0F, pairs >> 4], dim=-1).float()  # [b, g, quad, c, 4]
    q = q.permute(0, 3, 1, 2, 4).reshape(blocks * COLUMNS, groups, GROUP)
    scale, zero = scales_and_zeros.float().permute(2, 0, 3, 1).reshape(2, blocks * COLUMNS, groups, 1)
    return ((q - 8) * scale + zero).reshape(blocks * COLUMNS, groups * GROUP)


def _call(kernel: str, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y float32 [M, N] = kernel(x [M, K], packed weights, their scales); N = 16 · the packed blocks."""
    library = _library()
    assert library is not None, "CPU kernels not available"
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
