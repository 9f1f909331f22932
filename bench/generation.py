"""Generation throughput of the scheduler against raw `model.generate()`, side by side in one run.

    .venv/bin/python bench/generation.py                      # the tiny test-tier Llama, CPU
    .venv/bin/python bench/generation.py --threads 1           # steadier on a busy 2-core machine
    .venv/bin/python bench/generation.py --model PATH --tokens 64 --device cuda --dtype bfloat16

Reports (medians over interleaved rounds, so machine load hits every mode alike):
  single stream   scheduler decode tok/s vs `generate(do_sample=False)` on the same prompt (ratio)
  concurrency     aggregate tok/s with 1, 4, 8 (…) greedy streams submitted together (ratio vs 1)
Every request generates exactly --tokens tokens (ignore_eos), so the rates compare like for like.
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model is None:
        from engine.assets.tiny import build_test_tier

        args.model = build_test_tier(
            Path(__file__).resolve().parent.parent / "var" / "assets" / "test"
        ).model.local_path
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    streams = [int(s) for s in args.streams.split(",")]
    scheduler = GenerationScheduler(loaded, max_batch_size=max(streams)).start()
    print(
        f"model {Path(args.model).name}: {loaded.parameter_count / 1e6:.2f}M params, {loaded.dtype}, "
        f"{loaded.device}, torch threads {torch.get_num_threads()}, {args.tokens} tokens per request"
    )
    # Warm-up: first calls pay for lazy initialisation in torch and transformers.
    raw_generate_rate(loaded, PROMPTS[0], 8)
    scheduler_rate(scheduler, max(streams), 8)

    raw: list[float] = []
    single: list[float] = []
    concurrent: dict[int, list[float]] = {n: [] for n in streams}
    for _ in range(args.rounds):
        raw.append(raw_generate_rate(loaded, PROMPTS[0], args.tokens))
        single.append(scheduler_rate(scheduler, 1, args.tokens))
        for n in streams:
            concurrent[n].append(scheduler_rate(scheduler, n, args.tokens))
    scheduler.stop()

    raw_rate, single_rate = statistics.median(raw), statistics.median(single)
    print(f"{'single stream':<22}{'tok/s':>10}{'ratio':>9}")
    print(f"{'  model.generate()':<22}{raw_rate:>10.1f}{1.0:>9.2f}")
    print(f"{'  scheduler':<22}{single_rate:>10.1f}{single_rate / raw_rate:>9.2f}")
    base = statistics.median(concurrent[streams[0]])
    print(f"{'concurrent streams':<22}{'tok/s':>10}{'vs ' + str(streams[0]):>9}")
    for n in streams:
        rate = statistics.median(concurrent[n])
        print(f"{'  ' + str(n):<22}{rate:>10.1f}{rate / base:>9.2f}")


if __name__ == "__main__":
    main()
