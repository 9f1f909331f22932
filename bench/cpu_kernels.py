"""miLLM's CPU kernels on one decode step's matmuls, per quantization and row count, side by side in one run.

    .venv/bin/python bench/cpu_kernels.py                       # SmolLM2-135M's shapes, 1 / 8 / 96 rows
    .venv/bin/python bench/cpu_kernels.py --rows 1 8 --rounds 8

Every layer gets weights of its own (30 layers of fused q/k/v, o, fused gate/up and down, plus the tied
LM head, as SmolLM2-135M-Instruct has them), so a step streams them from memory as a real decode step
does: one matrix multiplied in a loop stays in cache and reads ~20 % faster at 8 rows. Prints, per
quantization (Q4: int4 weights × int8 activations per 32 inputs; Q8: W8A8) and row count, the median step time over
interleaved rounds, its GMAC/s and the cost per row against one row; then greedy sampling's argmax and
the MLP's SiLU·mul against torch's. One torch thread, as the inference process runs the kernels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import cpu_kernels  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 576, 1536, 30, 49152
KV_WIDTH = 3 * 64  # 3 KV heads of 64
LAYER_SHAPES = ((HIDDEN + 2 * KV_WIDTH, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN),
                (HIDDEN, INTERMEDIATE))  # (out, in): fused q/k/v, o, fused gate/up, down


def q4_weights(out_features: int, in_features: int) -> Callable[[torch.Tensor], torch.Tensor]:
    q = torch.randint(0, 16, (out_features, in_features))
    scale = torch.rand(out_features, in_features // cpu_kernels.GROUP) * 0.01
    zero = torch.randn(out_features, in_features // cpu_kernels.GROUP) * 0.01
    packed, scales_and_zeros = cpu_kernels.pack(q, scale, zero)
    return lambda x: cpu_kernels.matmul(x, packed, scales_and_zeros)


def q8_weights(out_features: int, in_features: int) -> Callable[[torch.Tensor], torch.Tensor]:
    packed = cpu_kernels.pack_int8(torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8))
    scales = (torch.rand(out_features) * 0.01).to(torch.bfloat16)
    return lambda x: cpu_kernels.matmul_int8(x, packed, scales)


def step_matmuls(build: Callable[[int, int], Callable[[torch.Tensor], torch.Tensor]]) -> list[tuple[int, Callable]]:
    """(in_features, multiply) for every matmul of one decode step, each with its own weights."""
    shapes = [shape for _ in range(LAYERS) for shape in LAYER_SHAPES] + [(VOCAB, HIDDEN)]
    return [(in_features, build(out_features, in_features)) for out_features, in_features in shapes]


def timed(function: Callable[..., object], *args: object, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function(*args)
        best = min(best, time.perf_counter() - started)
    return best


def run_step(matmuls: list[tuple[int, Callable]], inputs: dict[int, torch.Tensor]) -> None:
    for in_features, multiply in matmuls:
        multiply(inputs[in_features])


def torch_silu_mul(fused: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(fused[:, :INTERMEDIATE]) * fused[:, INTERMEDIATE:]


def kernel_silu_mul(fused: torch.Tensor) -> torch.Tensor | None:
    return cpu_kernels.silu_mul(fused, 0, INTERMEDIATE, INTERMEDIATE)


def torch_argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 8, 96])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    kernels = {name: step_matmuls(build) for name, build, kernel in (("Q4", q4_weights, "q4"), ("Q8", q8_weights, "q8"))
               if cpu_kernels.available(kernel)}
    if not kernels:
        raise SystemExit("miLLM's CPU kernels are not available here (no AVX-512 VNNI or no C compiler)")
    inputs = {rows: {k: torch.randn(rows, k) for k in (HIDDEN, INTERMEDIATE)} for rows in args.rows}
    macs_per_row = sum(LAYERS * out_f * in_f for out_f, in_f in LAYER_SHAPES) + VOCAB * HIDDEN
    times: dict[tuple[str, int], list[float]] = {(name, rows): [] for name in kernels for rows in args.rows}
    for _ in range(args.rounds):  # interleaved, so the machine's load hits every cell alike
        for name, matmuls in kernels.items():
            for rows in args.rows:
                times[(name, rows)].append(timed(run_step, matmuls, inputs[rows], repeats=2 if rows <= 8 else 1))
    print(f"one decode step's matmuls ({LAYERS} layers + LM head, {macs_per_row / 1e6:.0f}M MAC a row), "
          f"medians of {args.rounds} interleaved rounds, one thread")
    print(f"{'kernel':6} {'rows':>5} {'step ms':>9} {'GMAC/s':>8} {'ms a row':>9} {'× 1 row':>8}")
    for name in kernels:
        one = statistics.median(times[(name, args.rows[0])]) / args.rows[0]
        for rows in args.rows:
            seconds = statistics.median(times[(name, rows)])
            print(f"{name:6} {rows:5} {seconds * 1e3:9.2f} {macs_per_row * rows / seconds / 1e9:8.1f} "
                  f"{seconds / rows * 1e3:9.3f} {seconds / rows / one:8.2f}")

    print("\nper call, µs (median of 300)      torch    miLLM")
    for rows in (1, 8):
        logits, fused = torch.randn(rows, VOCAB), torch.randn(rows, 2 * INTERMEDIATE)
        for label, theirs, ours, tensor in ((f"argmax, {rows} × {VOCAB}", torch_argmax, cpu_kernels.argmax, logits),
                                            (f"SiLU·mul, {rows} × {INTERMEDIATE}", torch_silu_mul, kernel_silu_mul,
                                             fused)):
            medians = [statistics.median(timed(f, tensor) for _ in range(300)) * 1e6 for f in (theirs, ours)]
            print(f"  {label:30} {medians[0]:8.1f} {medians[1]:8.1f}")

if __name__ == "__main__":
    main()
