"""Generation throughput of the scheduler against raw `model.generate()`, side by side in one run.

    .venv/bin/python bench/generation.py                      # the tiny test-tier Llama, CPU
    .venv/bin/python bench/generation.py --threads 1           # steadier on a busy 2-core machine
    .venv/bin/python bench/generation.py --model PATH --tokens 64 --device cuda --dtype bfloat16
    .venv/bin/python bench/generation.py --model var/assets/demo/model --threads 1 --quantization q4 \
        --decode-kernels on off     # miLLM's decode attention/norm/rotary kernels against transformers' ops

Reports (medians over interleaved rounds, so machine load hits every mode alike):
  single stream   scheduler decode tok/s vs `generate(do_sample=False)` on the same prompt (ratio)
  concurrency     aggregate tok/s with 1, 4, 8 (…) greedy streams submitted together (ratio vs 1)
Every request generates exactly --tokens tokens (ignore_eos), so the rates compare like for like.
--decode-kernels on off: the same quantized model loaded twice, with and without engine/decode_kernels.py
(CPU Q4/Q8 on miLLM's kernels only), measured in the same interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.generation import GenerationRequest  # noqa: E402
from engine.loading import LoadedModel, load_model  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from engine.scheduler import GenerationScheduler  # noqa: E402

PROMPTS = (
    "The cat sat on the",
    "Once upon a time, in a city by the sea,",
    "Hello world",
    "The quick brown fox jumps over the lazy dog and",
)


def raw_generate_rate(loaded: LoadedModel, prompt: str, tokens: int) -> float:
    ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids.to(loaded.device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
    elapsed = time.perf_counter() - started
    assert out.shape[1] - ids.shape[1] == tokens
    return tokens / elapsed


def scheduler_rate(scheduler: GenerationScheduler, streams: int, tokens: int) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    handles = [scheduler.submit(GenerationRequest(PROMPTS[i % len(PROMPTS)], params)) for i in range(streams)]
    generated = 0
    for handle in handles:
        *_, finish = handle
        assert finish.finish_reason == "length", finish
        generated += finish.usage.completion_tokens
    return generated / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="a local model folder (default: the tiny test tier)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", default="1,4,8")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quantization", choices=["none", "q4", "q8"], default="none")
    parser.add_argument("--decode-kernels", nargs="+", choices=["on", "off"], default=["on"],
                        help="with (on) and/or without (off) engine/decode_kernels.py, interleaved")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model is None:
        from engine.assets.tiny import build_test_tier

        args.model = build_test_tier(
            Path(__file__).resolve().parent.parent / "var" / "assets" / "test"
        ).model.local_path
    quantization = None if args.quantization == "none" else args.quantization
    variants = {setting: _load(args, quantization, setting) for setting in args.decode_kernels}
    streams = [int(s) for s in args.streams.split(",")]
    schedulers = {setting: GenerationScheduler(loaded, max_batch_size=max(streams)).start()
                  for setting, loaded in variants.items()}
    first = next(iter(variants.values()))
    print(
        f"model {Path(args.model).name}: {first.parameter_count / 1e6:.2f}M params, {first.dtype}, "
        f"{first.device}, torch threads {torch.get_num_threads()}, {args.tokens} tokens per request"
    )
    for setting, loaded in variants.items():  # warm-up: first calls pay for lazy initialisation
        raw_generate_rate(loaded, PROMPTS[0], 8)
        scheduler_rate(schedulers[setting], max(streams), 8)

    raw: dict[str, list[float]] = {setting: [] for setting in variants}
    single: dict[str, list[float]] = {setting: [] for setting in variants}
    concurrent = {setting: {n: [] for n in streams} for setting in variants}
    for _ in range(args.rounds):
        for setting, loaded in variants.items():
            raw[setting].append(raw_generate_rate(loaded, PROMPTS[0], args.tokens))
            single[setting].append(scheduler_rate(schedulers[setting], 1, args.tokens))
            for n in streams:
                concurrent[setting][n].append(scheduler_rate(schedulers[setting], n, args.tokens))
    for scheduler in schedulers.values():
        scheduler.stop()

    for setting, loaded in variants.items():
        print(f"--- {loaded.variant}")
        raw_rate, single_rate = statistics.median(raw[setting]), statistics.median(single[setting])
        print(f"{'single stream':<22}{'tok/s':>10}{'ratio':>9}")
        print(f"{'  model.generate()':<22}{raw_rate:>10.1f}{1.0:>9.2f}")
        print(f"{'  scheduler':<22}{single_rate:>10.1f}{single_rate / raw_rate:>9.2f}")
        base = statistics.median(concurrent[setting][streams[0]])
        print(f"{'concurrent streams':<22}{'tok/s':>10}{'vs ' + str(streams[0]):>9}")
        for n in streams:
            rate = statistics.median(concurrent[setting][n])
            print(f"{'  ' + str(n):<22}{rate:>10.1f}{rate / base:>9.2f}")


def _load(args: argparse.Namespace, quantization: str | None, decode_kernels: str) -> LoadedModel:
    if decode_kernels == "on":
        return load_model(args.model, dtype=args.dtype, device=args.device, quantization=quantization)
    from engine import decode_kernels as kernels

    switch = kernels.use_cpu_kernels
    kernels.use_cpu_kernels = lambda model: False  # the model keeps transformers' sdpa, norms and rotary
    try:
        return load_model(args.model, dtype=args.dtype, device=args.device, quantization=quantization)
    finally:
        kernels.use_cpu_kernels = switch

if __name__ == "__main__":
    main()
