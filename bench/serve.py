"""The server against raw `model.generate()`, side by side in one run, on the same model.

    .venv/bin/python bench/serve.py                 # test tier (tiny Llama), quick
    .venv/bin/python bench/serve.py --tier demo     # SmolLM2-135M-Instruct (what `make run` serves)

Starts a real stack (`manage.py serve`: daphne + inference process + Redis) on a free port, loads
the tier's model, then prints (medians over interleaved rounds, so load hits both sides alike):
  single stream   server decode tok/s (streamed, openai client) vs `generate(do_sample=False)` (ratio)
  concurrency     aggregate tok/s at 1, 4, 8 streams (ratio vs 1)
  TTFT            time to first streamed token, p50 / p99 over every request above
Every request generates exactly --tokens tokens (ignore_eos), so the rates compare like for like.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.runtime import default_torch_threads  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAMES = {"test": "tiny-llama", "demo": "smollm2-135m-instruct"}
PROMPT = "Once upon a time, in a city by the sea,"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_stack(tier: str, var_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update({"MILLM_VAR_DIR": str(var_dir), "MILLM_DEMO_TIER": tier, "LOG_LEVEL": "warning",
                "MILLM_ASSET_CACHE": os.environ.get("MILLM_ASSET_CACHE", str(ROOT / "var" / "assets"))})
    process = subprocess.Popen([sys.executable, "manage.py", "serve", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/health", timeout=2).json()["data"]["status"] == "ok":
                return process, url
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise SystemExit("the stack did not become healthy")


def raw_rate(model, tokenizer, tokens: int) -> float:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
    assert out.shape[1] - ids.shape[1] == tokens
    return tokens / (time.perf_counter() - started)


async def one_stream(client: openai.AsyncOpenAI, model: str, tokens: int) -> tuple[int, float]:
    started = time.perf_counter()
    first = None
    count = 0
    stream = await client.completions.create(model=model, prompt=PROMPT, max_tokens=tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - started
        if chunk.usage:
            count = chunk.usage.completion_tokens
    return count, first or float("nan")


async def server_round(client: openai.AsyncOpenAI, model: str, streams: int, tokens: int,
                       ttfts: list[float]) -> float:
    started = time.perf_counter()
    results = await asyncio.gather(*(one_stream(client, model, tokens) for _ in range(streams)))
    elapsed = time.perf_counter() - started
    ttfts.extend(t for _, t in results)
    assert all(n == tokens for n, _ in results), results
    return sum(n for n, _ in results) / elapsed


async def measure(url, model_name, model, tokenizer, tokens: int, rounds: int):
    """One event loop for every request: raw generate() blocks it on purpose while it runs."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
    await server_round(client, model_name, 1, 4, [])  # warm-up both sides
    raw_rate(model, tokenizer, 4)
    raws, singles, ttfts = [], [], []
    by_streams: dict[int, list[float]] = {1: singles, 4: [], 8: []}
    for _ in range(rounds):
        raws.append(raw_rate(model, tokenizer, tokens))
        singles.append(await server_round(client, model_name, 1, tokens, ttfts))
        for streams in (4, 8):
            by_streams[streams].append(await server_round(client, model_name, streams, tokens, ttfts))
    await client.close()
    return raws, singles, ttfts, by_streams


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", choices=["test", "demo"], default="test")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per request (default 128 test, 32 demo)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tokens = args.tokens or (128 if args.tier == "test" else 32)
    model_name = MODEL_NAMES[args.tier]
    with tempfile.TemporaryDirectory(prefix="millm-bench-") as tmp:
        process, url = start_stack(args.tier, Path(tmp) / "var")
        try:
            loaded = httpx.post(f"{url}/api/models/{model_name}/load", timeout=900).json()["data"]
            local_path = loaded["local_path"]
            torch.set_num_threads(int(os.environ.get("MILLM_TORCH_THREADS") or default_torch_threads()))  # as served
            model = AutoModelForCausalLM.from_pretrained(local_path, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(local_path)
            raws, singles, ttfts, by_streams = asyncio.run(
                measure(url, model_name, model, tokenizer, tokens, args.rounds))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    raw, single = statistics.median(raws), statistics.median(singles)
    print(f"model {model_name}, {tokens} tokens per request, {args.rounds} interleaved rounds, torch threads "
          f"{torch.get_num_threads()}")
    print(f"single stream   raw generate() {raw:8.1f} tok/s   server {single:8.1f} tok/s   ratio {single / raw:.2f}")
    for streams, rates in by_streams.items():
        rate = statistics.median(rates)
        print(f"concurrency {streams:2d}  aggregate {rate:8.1f} tok/s   ratio vs 1 stream {rate / single:.2f}")
    print(f"TTFT            p50 {percentile(ttfts, 0.5) * 1000:7.1f} ms   p99 {percentile(ttfts, 0.99) * 1000:7.1f} ms"
          f"   ({len(ttfts)} requests)")


if __name__ == "__main__":
    main()
