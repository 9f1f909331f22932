"""Features returned per request (`return_features`) on the live stack (test tier): the same numbers
/api/inspect gives for the same text, per chunk when streaming, OpenAI's schemas still met, bad input 4xx."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.live.conftest import load_tiny
from tests.live.test_openai_conformance import assert_conforms

SAE = "tiny-llama-layer_2"
PROMPT = "The cat sat on the mat"
CAT = 7


@pytest.fixture(scope="module")
def url(live_stack):
    load_tiny(live_stack)
    response = httpx.post(f"{live_stack.url}/api/saes/{SAE}/attach", timeout=300)
    assert response.status_code == 200, response.text
    return live_stack.url


def monitoring(url) -> dict:
    return httpx.get(f"{url}/api/monitoring", timeout=30).json()["data"]


def comparable(frames: list[dict]) -> list[dict]:
    return [{k: f[k] for k in ("position", "type", "token", "token_id", "features")} for f in frames]


def completion(url, **extra) -> dict:
    response = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": "tiny-llama", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_return_features_equal_what_inspect_gives_for_the_same_text(url):
    settings = monitoring(url)
    top_k, always = settings["top_k"], settings["features"]
    inspected = httpx.post(f"{url}/api/inspect", json={"text": PROMPT}, timeout=60).json()["data"]
    body = completion(url, return_features={"top_k": top_k, "features": always, "positions": "prompt"})
    assert_conforms(body, "CreateCompletionResponse")
    returned = body["millm_features"]
    assert returned["sae"] == SAE == inspected["sae"]
    assert len(returned["tokens"]) == len(inspected["tokens"]) == body["usage"]["prompt_tokens"]
    assert comparable(returned["tokens"]) == comparable(inspected["tokens"])
    assert any(frame["features"] for frame in returned["tokens"])


def test_features_per_token_cover_prompt_and_generated_and_a_plain_request_has_none(url):
    plain = completion(url)
    assert "millm_features" not in plain
    body = completion(url, return_features={"top_k": 3, "features": [CAT]})
    assert body["choices"] == plain["choices"]  # asking changes nothing else
    tokens = body["millm_features"]["tokens"]
    prompt_tokens, generated = body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]
    assert [f["position"] for f in tokens] == list(range(prompt_tokens + generated - 1))
    assert all(str(CAT) in f["features"] and len(f["features"]) <= 4 for f in tokens)
    only_generated = completion(url, return_features={"top_k": 3, "positions": "generated"})["millm_features"]
    assert [f["type"] for f in only_generated["tokens"]] == ["generated"] * (generated - 1)


def test_streamed_chat_carries_features_per_chunk_and_conforms(url):
    request = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 6,
               "temperature": 0, "stream": True, "return_features": {"top_k": 2}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, json=request) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        assert_conforms(chunk, "CreateChatCompletionStreamResponse")
    streamed = [f for c in chunks for f in c.get("millm_features", {}).get("tokens", ())]
    whole = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                       json={**request, "stream": False}).json()
    assert_conforms(whole, "CreateChatCompletionResponse")
    assert comparable(streamed) == comparable(whole["millm_features"]["tokens"])
    assert streamed[0]["type"] == "prompt" and streamed[-1]["type"] == "generated"


def test_through_the_openai_client_extra_body(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    reply = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=2, temperature=0,
                                      extra_body={"return_features": {"top_k": 1}})
    assert reply.model_extra["millm_features"]["tokens"][0]["position"] == 0


@pytest.mark.parametrize("spec,param,code", [
    ({"top_k": 1000}, "return_features.top_k", "invalid_value"),
    ({"top_k": 0}, "return_features", "invalid_value"),
    ({"positions": "middle"}, "return_features.positions", "invalid_value"),
    ({"features": [1 << 20]}, "return_features.features", "invalid_feature_index"),
    ({"sae": "no-such-sae"}, "return_features.sae", "sae_not_attached"),
    ({"after": True}, "return_features.after", "invalid_value"),
])
def test_bad_return_features_get_a_clear_400(url, spec, param, code):
    response = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": "tiny-llama", "prompt": PROMPT, "max_tokens": 2, "return_features": spec})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
    assert "Traceback" not in error["message"] and "/" not in error["message"]
