"""The server against raw `model.generate()`, side by side in one run, on the same model.

    .venv/bin/python bench/serve.py                 # test tier (tiny Llama), quick
    .venv/bin/python bench/serve.py --tier demo     # SmolLM2-135M-Instruct (what `make run` serves)
    .venv/bin/python bench/serve.py --tier demo --quantizations none q4 q8
    .venv/bin/python bench/serve.py --tier demo --quantizations q4 --threads 1 2 1 2   # MILLM_TORCH_THREADS

Starts a real stack (`manage.py serve`: daphne + inference process + Redis) on a free port, then
each round loads the tier's model with each quantization in turn (rounds outermost, so a change in
the machine's load hits every variant alike) and prints one row per quantization (medians over the
rounds), always against the same raw float32 baseline, measured in the same rounds:
  raw fp32        `generate(do_sample=False)` tok/s of the float32 model in this process
  1 stream        server decode tok/s (streamed, openai client) and its ratio to raw fp32
  8 streams       aggregate tok/s and its ratio to 1 stream
  per round       the single stream's × raw and the 8 streams' × 1 stream of each round (the spread)
  TTFT            time to first streamed token of a ~34-token chat prompt (p50), against the raw
                  float32 forward pass of that prompt (p50), and their ratio
Every completion generates exactly --tokens tokens (ignore_eos), so the rates compare like for like.
--threads N M ...: one stack per entry, in that order (repeat entries to alternate them), each with
MILLM_TORCH_THREADS=N for the server and N torch threads for the raw baseline in this process.
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
CHAT_TOKENS = 34  # the chat prompt's length with the template, as in the TTFT goal
CHAT_TEXT = ("Please tell me a short story about a lighthouse keeper who finds a message in a bottle on a "
             "stormy night near the old harbour town and what she decides to do with it")
CHAT_WORDS = CHAT_TEXT.split(" ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_stack(tier: str, var_dir: Path, threads: int | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    if threads is not None:
        env["MILLM_TORCH_THREADS"] = str(threads)
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


def chat_messages(tokenizer) -> tuple[list[dict], torch.Tensor]:
    """The longest prefix of CHAT_WORDS whose templated prompt is at most CHAT_TOKENS tokens, and its ids."""
    for count in range(len(CHAT_WORDS), 0, -1):
        messages = [{"role": "user", "content": " ".join(CHAT_WORDS[:count])}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        if ids.shape[1] <= CHAT_TOKENS:
            return messages, ids
    raise SystemExit("no chat prompt fits")


def raw_forward(model, ids: torch.Tensor) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        model(ids, logits_to_keep=1)
    return time.perf_counter() - started


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


async def chat_ttft(client: openai.AsyncOpenAI, model: str, messages: list[dict]) -> float:
    started = time.perf_counter()
    stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0,
                                                  stream=True)
    first = None
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
    return first or float("nan")


async def server_round(client: openai.AsyncOpenAI, model: str, streams: int, tokens: int,
                       ttfts: list[float]) -> float:
    started = time.perf_counter()
    results = await asyncio.gather(*(one_stream(client, model, tokens) for _ in range(streams)))
    elapsed = time.perf_counter() - started
    ttfts.extend(t for _, t in results)
    assert all(n == tokens for n, _ in results), results
    return sum(n for n, _ in results) / elapsed


async def measure(url, model_name, model, tokenizer, tokens: int, rounds: int) -> dict[str, list[float]]:
    """One event loop for every request: raw generate() blocks it on purpose while it runs."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
    messages, chat_ids = chat_messages(tokenizer)
    await server_round(client, model_name, 1, 4, [])  # warm-up both sides
    await chat_ttft(client, model_name, messages)
    raw_rate(model, tokenizer, 4)
    raw_forward(model, chat_ids)
    figures: dict[str, list[float]] = {"raw": [], "single": [], "eight": [], "ttft": [], "forward": []}
    for _ in range(rounds):
        figures["raw"].append(raw_rate(model, tokenizer, tokens))
        figures["single"].append(await server_round(client, model_name, 1, tokens, []))
        figures["eight"].append(await server_round(client, model_name, 8, tokens, []))
        for _ in range(3):
            figures["forward"].append(raw_forward(model, chat_ids))
            figures["ttft"].append(await chat_ttft(client, model_name, messages))
    await client.close()
    figures["chat_tokens"] = [chat_ids.shape[1]]
    return figures


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", choices=["test", "demo"], default="test")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per request (default 128 test, 32 demo)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quantizations", nargs="+", default=["none", "q4", "q8"], choices=["none", "q4", "q8"])
    parser.add_argument("--threads", nargs="+", type=int, default=None,
                        help="MILLM_TORCH_THREADS per stack, e.g. 1 2 1 2 (default: the environment's or its default)")
    args = parser.parse_args()
    tokens = args.tokens or (128 if args.tier == "test" else 32)
    model_name = MODEL_NAMES[args.tier]
    rows: list[tuple[str, int, str, dict[str, list[float]]]] = []
    default_threads = int(os.environ.get("MILLM_TORCH_THREADS") or default_torch_threads())
    model = tokenizer = None
    for index, threads in enumerate(args.threads or [None]):
        with tempfile.TemporaryDirectory(prefix="millm-bench-") as tmp:
            process, url = start_stack(args.tier, Path(tmp) / f"var{index}", threads)
            # the raw baseline runs with the server's thread count
            torch.set_num_threads(threads or default_threads)
            try:
                stack_rows = {}
                for _ in range(args.rounds):
                    for quantization in args.quantizations:
                        response = httpx.post(f"{url}/api/models/{model_name}/load",
                                              params={"quantization": quantization}, timeout=900).json()
                        if not response["success"]:
                            raise SystemExit(f"loading {quantization}: {response['error']}")
                        served = httpx.get(f"{url}/api/models/{model_name}", timeout=30).json()["data"]
                        if model is None:  # the raw float32 baseline, in this process
                            model = AutoModelForCausalLM.from_pretrained(served["local_path"],
                                                                         dtype=torch.float32).eval()
                            tokenizer = AutoTokenizer.from_pretrained(served["local_path"])
                        figures = asyncio.run(measure(url, model_name, model, tokenizer, tokens, 1))
                        if quantization not in stack_rows:
                            stack_rows[quantization] = (quantization, threads or default_threads,
                                                        served["status_message"], figures)
                        else:
                            for key, values in figures.items():
                                if key != "chat_tokens":
                                    stack_rows[quantization][3][key].extend(values)
                rows.extend(stack_rows.values())
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
    chat_tokens = rows[0][3]["chat_tokens"][0]
    print(f"model {model_name}, {tokens} tokens per completion, {args.rounds} interleaved rounds, chat prompt "
          f"{chat_tokens} tokens; thr = MILLM_TORCH_THREADS of the server and torch threads of the raw baseline")
    print(f"{'quant':5} {'thr':>3}  {'raw fp32':>9}  {'1 stream':>9} {'×raw':>5}  {'8 streams':>9} {'×1':>5}  "
          f"{'TTFT':>8} {'fwd fp32':>8} {'×fwd':>5}  per round: ×raw | ×1")
    for quantization, threads, message, f in rows:
        raw, single, eight = (statistics.median(f[k]) for k in ("raw", "single", "eight"))
        ttft, forward = statistics.median(f["ttft"]), statistics.median(f["forward"])
        spread = " ".join(f"{s / r:.2f}" for r, s in zip(f["raw"], f["single"], strict=True)) + " | " + " ".join(
            f"{e / s:.2f}" for s, e in zip(f["single"], f["eight"], strict=True))
        print(f"{quantization:5} {threads:3}  {raw:9.1f}  {single:9.1f} {single / raw:5.2f}  {eight:9.1f} "
              f"{eight / single:5.2f}  {ttft * 1000:6.1f}ms {forward * 1000:6.1f}ms {ttft / forward:5.2f}  "
              f"[{spread}]   ({message})")
    print("rates in tok/s (medians over rounds); TTFT and fwd are p50 over 3 requests a round")


if __name__ == "__main__":
    main()
