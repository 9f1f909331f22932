"""Bad input on /v1 gets the right OpenAI-style 4xx (never a 5xx), before any model runs."""

import json

import pytest

from catalog.models import LanguageModel

pytestmark = pytest.mark.django_db

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(autouse=True)
def catalog(settings):
    settings.INFERENCE_TIMEOUT_S = 0.3
    LanguageModel.objects.create(name="tiny", repo_id="org/tiny")


CASES = [
    ("chat", {**CHAT, "max_tokens": -1}, 400, "max_tokens"),
    ("chat", {**CHAT, "max_tokens": "ten"}, 400, "max_tokens"),
    ("chat", {**CHAT, "temperature": 5}, 400, "temperature"),
    ("chat", {**CHAT, "top_p": 0}, 400, "top_p"),
    ("chat", {**CHAT, "messages": []}, 400, "messages"),
    ("chat", {**CHAT, "messages": "hello"}, 400, "messages"),
    ("chat", {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("chat", {"messages": CHAT["messages"]}, 400, "model"),
    ("chat", {**CHAT, "model": "no-such-model"}, 404, "model"),
    ("chat", {**CHAT, "model": "tiny:no-such-profile"}, 404, "model"),
    ("chat", {**CHAT, "n": 2}, 400, "n"),
    ("chat", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("chat", {**CHAT, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("chat", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("chat", {**CHAT, "top_logprobs": 3}, 400, None),
    ("chat", {**CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("chat", {**CHAT, "presence_penalty": 1.0}, 400, "presence_penalty"),
    ("chat", {**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("chat", {**CHAT, "steering": {"features": [{"index": -1, "strength": 1}]}}, 400, "steering.features.0.index"),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages"),
    ("completions", {"model": "tiny", "prompt": ""}, 400, "prompt"),
    ("completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"model": "tiny", "prompt": "x", "echo": True}, 400, "echo"),
    ("completions", {"model": "tiny", "prompt": "x", "logprobs": 9}, 400, "logprobs"),
    ("embeddings", {"model": "tiny", "input": ""}, 400, "input"),
    ("embeddings", {"model": "tiny", "input": []}, 400, "input"),
    ("embeddings", {"model": "nope", "input": "x"}, 404, "model"),
]

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings"}


@pytest.mark.parametrize("endpoint,body,status,param", CASES)
def test_bad_input_gets_an_openai_error(client, endpoint, body, status, param):
    response = client.post(ENDPOINTS[endpoint], json.dumps(body), content_type="application/json")
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_non_json_body(client):
    response = client.post("/v1/chat/completions", "{not json", content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "Request body is not valid JSON"


def test_no_inference_process_is_a_503_not_a_500(client):
    response = client.post("/v1/chat/completions", json.dumps(CHAT), content_type="application/json")
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "server_error"
    assert "No inference process answered" in response.json()["error"]["message"]


def test_models_lists_catalog_and_profile_aliases(client):
    from profiles.models import Profile

    Profile.objects.create(name="loud")
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids == ["tiny", "tiny:loud"]
    assert all(set(m) == {"id", "object", "created", "owned_by"} for m in body["data"])
