"""A probe: Q4 weights × int8 activations (W4A8, `bench/probes/w4a8.c`) against miLLM's Q4 kernel
(bf16 activations), on one decode step's matmuls, side by side in one run. Not part of the product.

    .venv/bin/python bench/w4a8_probe.py                 # 1 / 8 / 96 rows, 5 interleaved rounds
    .venv/bin/python bench/w4a8_probe.py --rows 1 8 --rounds 8

Builds the probe with the system C compiler into a temporary folder, checks it against the W4A8 math in
float64 (it exits if it is off), then prints the medians of interleaved rounds, and how far each kernel's
output is from the exact product of the same quantized weights (the precision W4A8 gives up). The weights
are random with SmolLM2-135M's shapes, every layer its own (bench/cpu_kernels.py), so they stream from
memory as in a real decode step. Needs AVX-512 BF16 and VNNI.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.cpu_kernels import HIDDEN, INTERMEDIATE, LAYER_SHAPES, LAYERS, VOCAB, run_step, timed  # noqa: E402
from engine import cpu_kernels  # noqa: E402

PROBE = Path(__file__).resolve().parent / "probes" / "w4a8.c"


def build(folder: Path) -> ctypes.CDLL:
    target = folder / "w4a8.so"
    subprocess.run(["cc", *cpu_kernels.FLAGS, "-o", str(target), str(PROBE), "-lm"], check=True)
    library = ctypes.CDLL(str(target))
    library.millm_w4a8_matmul.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                                          ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p]
    library.millm_w4a8_matmul.restype = ctypes.c_int
    return library


def pack_w4a8(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q int [N, K] in 0..15 → the probe's nibbles [N/16, K/32, 4, 64]; scales and zeros as the Q4 kernel's."""
    n, k = q.shape
    blocks, groups = n // cpu_kernels.COLUMNS, k // cpu_kernels.GROUP
    nibbles = q.to(torch.uint8).reshape(blocks, cpu_kernels.COLUMNS, groups, 4, 2, 4)  # [b, c, g, t, half, e]
    packed = (nibbles[..., 0, :] | (nibbles[..., 1, :] << 4)).permute(0, 2, 3, 1, 4).reshape(blocks, groups, 4, 64)
    _, scales_and_zeros = cpu_kernels.pack(q, scale, zero)
    return packed.contiguous(), scales_and_zeros


def random_weights(out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups = in_features // cpu_kernels.GROUP
    return (torch.randint(0, 16, (out_features, in_features)), torch.rand(out_features, groups) * 0.01 + 1e-3,
            torch.randn(out_features, groups) * 0.01)


def dequantized(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    s, z = (t.to(torch.bfloat16).double().repeat_interleave(cpu_kernels.GROUP, 1) for t in (scale, zero))
    return (q.double() - 8) * s + z


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 8, 96])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not (cpu_kernels.available("q4") and cpu_kernels.available("q8")):
        raise SystemExit("needs AVX-512 BF16 and VNNI and a C compiler")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="w4a8-") as folder:
        library = build(Path(folder))

        def probe(packed: torch.Tensor, scales: torch.Tensor, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
            def multiply(x: torch.Tensor) -> torch.Tensor:
                x, y = x.float().contiguous(), torch.empty(x.shape[0], n)
                if library.millm_w4a8_matmul(x.data_ptr(), x.shape[0], x.shape[1], packed.data_ptr(),
                                             scales.data_ptr(), n, y.data_ptr()):
                    raise MemoryError("w4a8: no scratch")
                return y
            return multiply

        torch.manual_seed(0)
        weights = random_weights(96, 128)
        exact_weights = dequantized(*weights)
        w4a8 = probe(*pack_w4a8(*weights), 96)
        q4_packed = cpu_kernels.pack(*weights)
        print("error, largest |Δ| / largest |y| against the exact product of the quantized weights")
        for rows in (1, 8, 13):
            x = torch.randn(rows, 128)
            inverse = (1.0 / x.abs().amax(-1, keepdim=True).clamp(min=1e-30)) * 127
            expected = (torch.round(x * inverse).double() @ exact_weights.T) / inverse.double()
            ours = w4a8(x).double()
            if (ours - expected).abs().max() > 1e-5 * expected.abs().max():
                raise SystemExit(f"the probe is off the W4A8 math at {rows} rows")
            exact = x.double() @ exact_weights.T
            q4 = cpu_kernels.matmul(x, *q4_packed).double()
            print(f"  {rows:3} rows   Q4 (bf16 activations) {float((q4 - exact).abs().max() / exact.abs().max()):.4f}"
                  f"   W4A8 {float((ours - exact).abs().max() / exact.abs().max()):.4f}")

        shapes = [shape for _ in range(LAYERS) for shape in LAYER_SHAPES] + [(VOCAB, HIDDEN)]
        step: dict[str, list[tuple[int, Callable]]] = {"Q4": [], "W4A8": []}
        for out_features, in_features in shapes:
            w = random_weights(out_features, in_features)
            packed, scales = cpu_kernels.pack(*w)
            step["Q4"].append((in_features, lambda x, p=packed, s=scales: cpu_kernels.matmul(x, p, s)))
            step["W4A8"].append((in_features, probe(*pack_w4a8(*w), out_features)))
        inputs = {rows: {k: torch.randn(rows, k) for k in (HIDDEN, INTERMEDIATE)} for rows in args.rows}
        times: dict[tuple[str, int], list[float]] = {(name, rows): [] for name in step for rows in args.rows}
        for _ in range(args.rounds):
            for name, matmuls in step.items():
                for rows in args.rows:
                    times[(name, rows)].append(timed(run_step, matmuls, inputs[rows], repeats=2 if rows <= 8 else 1))
    print(f"\none decode step's matmuls, ms (medians of {args.rounds} interleaved rounds, one thread)")
    print(f"{'rows':>5} {'Q4':>9} {'W4A8':>9} {'W4A8/Q4':>8}")
    for rows in args.rows:
        q4, a8 = (statistics.median(times[(name, rows)]) * 1e3 for name in ("Q4", "W4A8"))
        print(f"{rows:5} {q4:9.2f} {a8:9.2f} {a8 / q4:8.2f}")


if __name__ == "__main__":
    main()
