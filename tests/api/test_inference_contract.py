"""The typed web ↔ inference contract: malformed calls get an error reply (the process serves on),
and an engine error keeps its code on its way to either surface (/v1's OpenAI shape, /api's envelope)."""

from __future__ import annotations

import asyncio
import json

import pytest
from django.conf import settings

from catalog.models import LanguageModel
from engine.errors import STATUS_BY_CODE, InvalidRequestError
from inference import messages as m
from inference.client import reply_from
from inference.handlers import error_reply
from millm_site.channel_layer import OneTripRedisChannelLayer
from millm_site.errors import InvalidRequest, MillmError, ModelNotFound, error_for_code
from serving.completions import openai_error

pytestmark = pytest.mark.django_db


def exchange(raw_calls: list[dict]) -> list[dict]:
    """Send raw (possibly malformed) calls to the inference channel and read each reply."""

    async def run() -> list[dict]:
        layer = OneTripRedisChannelLayer(**settings.CHANNEL_LAYERS["default"]["CONFIG"])
        replies = []
        for raw in raw_calls:
            reply_channel = await layer.new_channel()
            await layer.send(settings.INFERENCE_CHANNEL, {**raw, "reply_channel": reply_channel})
            replies.append(await asyncio.wait_for(layer.receive(reply_channel), 10))
        return replies

    return asyncio.run(run())


@pytest.mark.parametrize("raw,param", [
    ({"type": "load_model"}, "model"),  # the model name is missing
    ({"type": "statistics", "top": "many"}, "top"),
    ({"type": "set_steering", "steering": {"features": [{"index": "seven", "strength": 1.0}]}},
     "steering.features.0.index"),
    ({"type": "generate", "request_id": "r1", "steering": {"mode": "multiply"}}, "steering.mode"),
    ({"type": "ping", "surprise": 1}, "surprise"),
    ({"type": "format_disk"}, None),
])
def test_a_malformed_call_gets_an_error_reply_and_the_process_serves_on(inference_worker, raw, param):
    malformed, pong = exchange([raw, {"type": "ping"}])
    error = m.parse_reply(malformed)
    assert isinstance(error, m.Error)
    assert (error.code, error.status, error.param) == ("VALIDATION_ERROR", 422, param)
    assert error.message.startswith(f"malformed {raw['type']!r} call")
    assert isinstance(m.parse_reply(pong), m.Pong)


def test_an_engine_error_becomes_an_error_reply_with_its_code_status_and_param():
    reply = error_reply(InvalidRequestError(param="max_tokens", message="too long", code="context_length_exceeded"))
    assert reply == m.Error(code="CONTEXT_LENGTH_EXCEEDED", status=400, message="too long", param="max_tokens")
    unexpected = error_reply(KeyError("/secret/path"))
    assert (unexpected.code, unexpected.status) == ("INTERNAL_ERROR", 500) and "/secret" not in unexpected.message


def test_an_error_reply_raises_the_millm_error_for_its_code():
    with pytest.raises(ModelNotFound) as caught:
        reply_from(m.Error(code="MODEL_NOT_FOUND", status=404, message="No model named 'x'").model_dump())
    assert caught.value.status == 404
    with pytest.raises(MillmError) as caught:
        reply_from({"type": "chunk", "text": 3})  # malformed reply: refused, not trusted
    assert caught.value.code == "INTERNAL_ERROR"


def test_every_documented_code_has_one_status_on_both_sides():
    for code, status in STATUS_BY_CODE.items():
        assert error_for_code(code, "m").status == status
    assert InvalidRequest.status == STATUS_BY_CODE["INVALID_VALUE"] == 400


@pytest.mark.parametrize("error,body,status", [
    (error_for_code("CONTEXT_LENGTH_EXCEEDED", "prompt too long", param="max_tokens"),
     {"message": "prompt too long", "type": "invalid_request_error", "param": "max_tokens",
      "code": "context_length_exceeded"}, 400),
    (error_for_code("INFERENCE_UNAVAILABLE", "gone"),
     {"message": "gone", "type": "server_error", "param": None, "code": "service_unavailable"}, 503),
    (error_for_code("INSUFFICIENT_MEMORY", "too big"),
     {"message": "too big", "type": "server_error", "param": None, "code": "insufficient_memory"}, 507),
])
def test_a_domain_error_maps_to_the_openai_shape(error, body, status):
    mapped = openai_error(error)
    assert (mapped.body(), mapped.status) == ({"error": body}, status)


def test_an_engine_refusal_reaches_v1_in_the_openai_shape(client, inference_worker):
    LanguageModel.objects.create(name="tiny", repo_id="org/tiny")  # in the catalog, not loaded
    response = client.post("/v1/chat/completions", json.dumps(
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}), content_type="application/json")
    assert response.status_code == 400, response.content
    assert response.json()["error"] == {"message": "No model is loaded: load one with POST /api/models/{name}/load",
                                        "type": "invalid_request_error", "param": None, "code": "model_not_loaded"}


def test_an_engine_refusal_reaches_api_in_the_envelope(client, inference_worker):
    response = client.post("/api/monitoring/statistics/top", json.dumps({"n": 3, "by": "max"}),
                           content_type="application/json")
    assert response.status_code == 400, response.content
    assert response.json() == {"success": False, "data": None, "error": {
        "code": "SAE_NOT_ATTACHED", "message": "No SAE is attached: no feature statistics", "details": {}}}

