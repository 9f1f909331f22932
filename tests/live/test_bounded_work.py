"""A live stack (test tier) under the issue-10 scenarios: a chat sent while the stack is still
starting waits for the inference process instead of a 503 (startup race), and 50 concurrent clients
x 20 requests (mixed stream / non-stream, some steered inline) lose and mix nothing: every answer
equals its request's single-request greedy answer."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.live.conftest import LiveStack, load_tiny

SAE = "tiny-llama-layer_2"
CAT = 7  # the test tier's ' cat' feature
PROMPTS = ["Hello!", "Tell me about the sea.", "Once upon a time", "What is a dog?", "The garden"]
STEERINGS = [None, {"features": [{"index": CAT, "strength": 4.0}]}]
CLIENTS, PER_CLIENT = 50, 20
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def restarted_stack(tmp_path_factory):
    """A stack that had the model loaded and the SAE attached, started again: the new inference process
    restores them while the first requests arrive."""
    var = tmp_path_factory.mktemp("bounded") / "var"
    first = LiveStack(var)
    try:
        first.wait_healthy()
        load_tiny(first)
        assert httpx.post(f"{first.url}/api/saes/{SAE}/attach", timeout=300).status_code == 200
    finally:
        first.stop()
    stack = LiveStack(var, port=first.port)
    yield stack
    stack.stop()


def body(prompt: str, steering: dict | None, stream: bool) -> dict:
    return {"model": "tiny-llama", "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": stream, **({"steering": steering} if steering else {})}


async def answer(client: httpx.AsyncClient, url: str, prompt: str, steering: dict | None, stream: bool) -> str:
    if not stream:
        response = await client.post(f"{url}/v1/chat/completions", json=body(prompt, steering, False))
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]
    pieces, done = [], False
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body(prompt, steering, True)) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            pieces += [c["delta"].get("content") or "" for c in chunk["choices"]]
    assert done
    return "".join(pieces)


def test_a_chat_sent_while_the_stack_starts_waits_for_the_model(restarted_stack):
    """Before: /v1/models listed the model while the first chat got 503 (no process answered in 5 s)."""
    stack = restarted_stack
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the first moment daphne answers
        try:
            if httpx.get(f"{stack.url}/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    health = httpx.get(f"{stack.url}/api/health", timeout=10).json()["data"]
    started = time.monotonic()
    response = httpx.post(f"{stack.url}/v1/chat/completions", json=body("Hello!", None, False), timeout=180)
    waited_s = time.monotonic() - started
    print(f"\nfirst chat after daphne answered: {response.status_code} in {waited_s:.1f}s "
          f"(health then: {health.get('status')}, loaded: {health.get('loaded_model')})")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]


def test_fifty_clients_lose_and_mix_nothing(restarted_stack):
    stack = restarted_stack
    stack.wait_healthy()
    cases = [(p, s) for p in PROMPTS for s in range(len(STEERINGS))]

    async def run():
        limits = httpx.Limits(max_connections=CLIENTS + 5)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            expected = {case: await answer(client, stack.url, case[0], STEERINGS[case[1]], False) for case in cases}
            assert len({expected[(p, 0)] for p in PROMPTS}) > 1  # distinct answers: a mix-up would show
            assert any(expected[(p, 0)] != expected[(p, 1)] for p in PROMPTS)  # steering shows too
            mismatches: list = []

            async def one_client(n: int) -> int:
                done = 0
                for i in range(PER_CLIENT):
                    case = cases[(n * 7 + i) % len(cases)]
                    got = await answer(client, stack.url, case[0], STEERINGS[case[1]], stream=(n + i) % 2 == 0)
                    if got != expected[case]:
                        mismatches.append((n, i, case, got, expected[case]))
                    done += 1
                return done

            started = time.monotonic()
            counts = await asyncio.gather(*(one_client(n) for n in range(CLIENTS)))
            return counts, mismatches, time.monotonic() - started

    counts, mismatches, elapsed_s = asyncio.run(run())
    print(f"\n{sum(counts)} requests from {CLIENTS} clients in {elapsed_s:.1f}s")
    assert sum(counts) == CLIENTS * PER_CLIENT
    assert not mismatches, mismatches[:5]
