"""Every 200 from /v1 conforms to OpenAI's own OpenAPI schemas (tests/fixtures: a subset of OpenAI's
openapi.yaml, MIT), including `message.refusal` and `logprobs` present even when null."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.live.conftest import load_tiny


def honour_nullable(node):
    """OpenAPI 3.0's `nullable: true` (which the spec still uses) is `type: [T, "null"]` in JSON Schema."""
    if isinstance(node, list):
        return [honour_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: honour_nullable(value) for key, value in node.items()}
    if node.pop("nullable", False):
        if isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        if "enum" in node:
            node["enum"] = [*node["enum"], None]
    return node


SPEC = honour_nullable(yaml.safe_load(
    (Path(__file__).resolve().parent.parent / "fixtures" / "openai-openapi-subset.yaml").read_text()))
REGISTRY = Registry().with_resource("urn:openai", Resource.from_contents(SPEC, default_specification=DRAFT202012))


def assert_conforms(body: dict, schema_name: str) -> None:
    validator = Draft202012Validator({"$ref": f"urn:openai#/components/schemas/{schema_name}"}, registry=REGISTRY)
    errors = sorted(validator.iter_errors(body), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors[:5]]


@pytest.fixture(scope="module")
def url(live_stack):
    load_tiny(live_stack)
    return live_stack.url


CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}


def test_models_list(url):
    assert_conforms(httpx.get(f"{url}/v1/models").json(), "ListModelsResponse")


@pytest.mark.parametrize("extra", [{}, {"logprobs": True, "top_logprobs": 2}, {"temperature": 0.7, "seed": 3}])
def test_chat_completion(url, extra):
    body = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, **extra}, timeout=60).json()
    assert_conforms(body, "CreateChatCompletionResponse")
    assert body["choices"][0]["message"]["refusal"] is None


def test_chat_completion_stream_chunks(url):
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                      json={**CHAT, "stream": True, "stream_options": {"include_usage": True}}) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        assert_conforms(chunk, "CreateChatCompletionStreamResponse")
    assert chunks[-1]["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("extra", [{}, {"logprobs": 2}])
def test_text_completion(url, extra):
    body = httpx.post(f"{url}/v1/completions", json={"model": "tiny-llama", "prompt": "The cat", "max_tokens": 5,
                                                     **extra}, timeout=60).json()
    assert_conforms(body, "CreateCompletionResponse")


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_embeddings(url, encoding):
    body = httpx.post(f"{url}/v1/embeddings", json={"model": "tiny-llama", "input": ["a cat", "the sea"],
                                                    "encoding_format": encoding}, timeout=60).json()
    assert_conforms(body, "CreateEmbeddingResponse")
