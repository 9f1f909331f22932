"""Monitoring costs, measured side by side in one run.

    .venv/bin/python bench/monitoring.py                 # test tier
    .venv/bin/python bench/monitoring.py --tier demo     # SmolLM2 + its SAE

1. Decode slowdown with monitoring on (top-k per token, 20 always-reported features, running
   statistics) against the same SAE attached with monitoring off, in-process, interleaved rounds.
2. Event lag token -> WebSocket: a live stack (`manage.py serve`), a `websockets` client on
   /ws/monitor/, streamed requests; lag = receive time - the time the inference process built the
   frame (same machine clock). Includes the throttle's wait (MILLM_MONITOR_MAX_HZ, default 10/s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import torch
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve import MODEL_NAMES, percentile, start_stack  # noqa: E402
from bench.steering import PROMPT, build, decode_rate  # noqa: E402
from engine.runtime import EngineRuntime  # noqa: E402


def slowdown(tier: str, tokens: int, rounds: int) -> tuple[float, float]:
    assets = build(tier, Path(os.environ.get("MILLM_ASSET_CACHE", ROOT / "var" / "assets")))
    runtime = EngineRuntime()
    runtime.load(name="bench", path=str(assets.model.local_path))
    runtime.attach_sae(name="bench-sae", path=str(assets.sae.local_path))
    runtime.configure_monitoring(top_k=10, features=list(range(0, 20 * 3, 3)))
    scheduler = runtime.scheduler

    def rate(monitor: bool) -> float:
        from engine.generation import FinishEvent, GenerationRequest
        from engine.sampling import SamplingParams

        handle = scheduler.submit(GenerationRequest(PROMPT, SamplingParams(max_tokens=tokens, temperature=0.0,
                                                                           ignore_eos=True), monitor=monitor))
        first = last = None
        for event in handle:
            if isinstance(event, FinishEvent):
                break
            last = time.perf_counter()
            first = first or last
        return (tokens - 1) / (last - first)

    decode_rate(runtime, 8, None)
    off, on = [], []
    for _ in range(rounds):
        off.append(rate(False))
        on.append(rate(True))
    runtime.unload()
    return statistics.median(off), statistics.median(on)


async def lags(url: str, model: str, requests: int, tokens: int) -> list[float]:
    found: list[float] = []
    async with websockets.connect(url.replace("http", "ws") + "/ws/monitor/?format=json") as ws:
        await ws.recv()
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)

        async def listen():
            while True:
                event = json.loads(await ws.recv())
                now = time.time()
                if event["kind"] == "activation_update":
                    found.extend(now - f["produced_at"] for f in event["payload"]["frames"] if "produced_at" in f)

        listener = asyncio.ensure_future(listen())
        for _ in range(requests):
            stream = await client.completions.create(model=model, prompt=PROMPT, max_tokens=tokens, temperature=0,
                                                     stream=True, extra_body={"ignore_eos": True})
            async for _chunk in stream:
                pass
        await asyncio.sleep(0.5)
        listener.cancel()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", choices=["test", "demo"], default="test")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    tokens = args.tokens or (200 if args.tier == "test" else 48)
    off, on = slowdown(args.tier, tokens, args.rounds)
    print(f"decode, monitoring off  {off:8.1f} tok/s")
    print(f"decode, monitoring on   {on:8.1f} tok/s   (top-10 per token, 20 monitored features, statistics)")
    print(f"slowdown (off / on)     {off / on:8.3f}   (goal <= 1.05)")
    model = MODEL_NAMES[args.tier]
    with tempfile.TemporaryDirectory(prefix="millm-bench-") as tmp:
        process, url = start_stack(args.tier, Path(tmp) / "var")
        try:
            httpx.post(f"{url}/api/models/{model}/load", timeout=900).raise_for_status()
            sae = next(s["name"] for s in httpx.get(f"{url}/api/saes").json()["data"] if s["model"] == model)
            httpx.post(f"{url}/api/saes/{sae}/attach", timeout=900).raise_for_status()
            measured = asyncio.run(lags(url, model, 3, min(tokens, 64)))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    print(f"event lag token->WebSocket  p50 {percentile(measured, 0.5) * 1000:7.1f} ms   "
          f"p99 {percentile(measured, 0.99) * 1000:7.1f} ms   ({len(measured)} frames; throttle "
          f"{os.environ.get('MILLM_MONITOR_MAX_HZ', '10')}/s)  torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
