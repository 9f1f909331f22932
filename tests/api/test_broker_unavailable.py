"""With the message broker (Redis) away, both APIs refuse cleanly with 503 in their own shape, never a 500."""

import pytest

from catalog.models import LanguageModel

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def broker_away(settings, tmp_path):
    # A unix socket nobody listens on: every channel-layer call fails to connect, as while Redis restarts.
    layers = {**settings.CHANNEL_LAYERS["default"]}
    layers["CONFIG"] = {**layers["CONFIG"], "hosts": [{"address": f"unix://{tmp_path}/gone.sock", "socket_timeout": 1}]}
    settings.CHANNEL_LAYERS = {"default": layers}
    settings.INFERENCE_TIMEOUT_S = 0.3
    LanguageModel.objects.create(name="tiny", repo_id="org/tiny")


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}),
    ("/v1/completions", {"model": "tiny", "prompt": "hi"}),
    ("/v1/embeddings", {"model": "tiny", "input": "hi"}),
])
def test_v1_answers_503_service_unavailable(client, path, body):
    response = client.post(path, body, content_type="application/json")
    assert response.status_code == 503, response.content
    error = response.json()["error"]
    assert (error["code"], error["type"]) == ("service_unavailable", "server_error")
    assert "/" not in error["message"]  # no socket path or traceback leaks


@pytest.mark.parametrize("method, path", [("post", "/api/models/tiny/load"),
                                          ("delete", "/api/steering")])
def test_api_answers_503_inference_unavailable(client, method, path):
    response = getattr(client, method)(path)
    assert response.status_code == 503, response.content
    body = response.json()
    assert body["success"] is False and body["error"]["code"] == "INFERENCE_UNAVAILABLE"
    assert "/" not in body["error"]["message"]
