"""The real `openai` client against the live stack (daphne + inference process + Redis), test tier."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import openai
import pytest

from tests.live.conftest import load_tiny


@pytest.fixture(scope="module")
def served(live_stack):
    load_tiny(live_stack)
    return live_stack


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=60)


CHAT = [{"role": "user", "content": "Tell me about the river."}]


def test_chat_completion_sync(client):
    reply = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=12, temperature=0)
    assert reply.object == "chat.completion" and reply.model == "tiny-llama"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_text_equals_unstreamed_text(client):
    whole = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
           [whole.choices[0].finish_reason]


def test_text_completion_and_logprobs(client):
    reply = client.completions.create(model="tiny-llama", prompt="The cat", max_tokens=6, temperature=0, logprobs=2)
    choice = reply.choices[0]
    assert reply.object == "text_completion"
    assert len(choice.logprobs.tokens) == reply.usage.completion_tokens
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)


def test_16_concurrent_streamed_greedy_requests_match_alone(served):
    prompts = [f"Story number {i} about the moon" for i in range(16)]
    sync = openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0)
    alone = [sync.completions.create(model="tiny-llama", prompt=p, max_tokens=16, temperature=0).choices[0].text
             for p in prompts]

    async def together():
        client = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0, timeout=120)

        async def one(prompt):
            stream = await client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=16, temperature=0,
                                                     stream=True)
            return "".join([c.choices[0].text async for c in stream if c.choices])

        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(together()) == alone


def test_seeded_sampling_repeats(client):
    def sample():
        return client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=16, temperature=1.0,
                                              seed=1234).choices[0].message.content

    assert sample() == sample()


def test_steering_header_and_embeddings(client, served):
    raw = client.chat.completions.with_raw_response.create(model="tiny-llama", messages=CHAT, max_tokens=3)
    assert raw.headers["x-millm-steering"] == "none"
    assert raw.parse().model_extra["millm_steering"] == "none"
    # Which steering ran is in the header, in the body and in a stream's last chunk alike.
    inline = {"steering": {"vectors": [{"layer": 1, "vector": [0.5] * 64, "strength": 4.0}]}}
    steered = client.chat.completions.with_raw_response.create(model="tiny-llama", messages=CHAT, max_tokens=3,
                                                                extra_body=inline)
    assert steered.headers["x-millm-steering"] == "inline" == steered.parse().model_extra["millm_steering"]
    chunks = list(client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=3, stream=True,
                                                 extra_body=inline))
    assert [c.model_extra.get("millm_steering") for c in chunks if c.choices and c.choices[0].finish_reason] == ["inline"]
    embedding = client.embeddings.create(model="tiny-llama", input=["a cat", "a dog"])
    assert len(embedding.data) == 2 and len(embedding.data[0].embedding) == 64


def test_context_overflow_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny-llama", prompt="word " * 3000, max_tokens=5)
    assert caught.value.code == "context_length_exceeded"


def test_client_disconnect_cancels_the_generation(client, served):
    before = httpx.get(f"{served.url}/api/health").json()["data"]["inference"]["tokens_total"]
    stream = client.completions.create(model="tiny-llama", prompt="Once", max_tokens=900, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        health = httpx.get(f"{served.url}/api/health").json()["data"]["inference"]
        if health["active_requests"] == 0:
            break
        time.sleep(0.1)
    assert health["active_requests"] == 0
    assert health["tokens_total"] - before < 600, "the abandoned generation ran on instead of being cancelled"


def test_killing_the_inference_process_mid_stream_gives_a_clean_error_then_recovers(client, served):
    from tests.live.test_serve import children_by_name

    victim = children_by_name(served)["inference"]
    stream = client.completions.create(model="tiny-llama", prompt="Once", max_tokens=900, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    os.kill(victim.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(openai.APIError, match="inference process stopped"):
        for _ in chunks:
            pass
    assert time.monotonic() - started < 15
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        inference = httpx.get(f"{served.url}/api/health").json()["data"]["inference"]
        if inference["up"] and inference.get("pid") != victim.pid and inference.get("loaded_model") == "tiny-llama":
            break
        time.sleep(0.3)
    reply = client.completions.create(model="tiny-llama", prompt="The moon", max_tokens=5, temperature=0)
    assert reply.usage.completion_tokens >= 1
