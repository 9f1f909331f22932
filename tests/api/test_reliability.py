"""Reliability battery: bad input on /v1 and /api gets a 4xx in that API's documented shape, echoes at
most a short slice of itself, and changes nothing (catalog, labels, profiles, steering, downloads).

No inference process runs here and its timeout is short: a bad input that slipped past validation
would reach for it and come back as a 503, which fails the test.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.conf import settings

from catalog.models import LanguageModel
from downloads.models import Download
from monitoring.models import RequestRecord
from profiles.models import Profile, ProfileFeature
from steering.models import FeatureLabel, LabelSource, SparseAutoencoder, SteeringState
from tests import factories

pytestmark = pytest.mark.django_db

ECHO_LIMIT = 200  # at most this much of any input string may come back in an error
LONG = "z" * 5000
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
TEXT = {"model": "tiny", "prompt": "hi"}
EMBED = {"model": "tiny", "input": "hi"}
HUGE = 18446744073709551616  # 2**64: one past unsigned 64-bit
OVER_LIMIT = "x" * (2_621_440 + 10)  # Django's DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MiB) plus a little
STEER = {"features": [{"index": 3, "strength": 1.0}]}
PROFILE = {"name": "fresh", "model": "tiny", "sae": "tiny-sae", "features": [{"index": 1, "strength": 1.0}]}


@pytest.fixture(autouse=True)
def catalog(settings):
    settings.INFERENCE_TIMEOUT_S = 0.3
    model = factories.language_model("tiny")
    sae = factories.sparse_autoencoder(model, "tiny-sae")
    factories.feature_labels(sae, {1: "cats", 2: "rivers"})
    FeatureLabel.objects.filter(index=2).update(max_activation=4.5)
    factories.feature_labels(sae, {5: "mine"}, source=LabelSource.MANUAL)
    factories.profile("calm", features={3: 2.0}, model=model, sae=sae)
    state = SteeringState.current()
    state.sae, state.features, state.source_profile = sae, [{"index": 3, "strength": 2.0}], "calm"
    state.save()
    Download.objects.create(kind="model", repo_id="org/tiny")


def snapshot() -> dict[str, Any]:
    return {
        "models": list(LanguageModel.objects.order_by("pk").values()),
        "saes": list(SparseAutoencoder.objects.order_by("pk").values()),
        "labels": list(FeatureLabel.objects.order_by("pk").values()),
        "profiles": list(Profile.objects.order_by("pk").values()),
        "profile_features": list(ProfileFeature.objects.order_by("pk").values()),
        "steering": list(SteeringState.objects.values()),
        "downloads": list(Download.objects.order_by("pk").values()),
        "history": RequestRecord.objects.count(),
    }


def body_of(payload: Any) -> str:
    return payload if isinstance(payload, str) else json.dumps(payload)


def strings_in(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*strings_in(k), *strings_in(v))]
    if isinstance(value, list):
        return [s for item in value for s in strings_in(item)]
    return []


# (method, path, body or None, status) — the API's shape follows from the path.
V1_CASES = [
    # numbers past 64 bits used to crash the msgpack transport (500)
    ("POST", "/v1/chat/completions", {**CHAT, "max_tokens": HUGE}, 400),
    ("POST", "/v1/chat/completions", {**CHAT, "seed": 1180591620717411303424}, 400),
    ("POST", "/v1/chat/completions", {**CHAT, "seed": -(2**63) - 1}, 400),
    ("POST", "/v1/chat/completions", {**CHAT, "max_completion_tokens": 2**70}, 400),
    ("POST", "/v1/chat/completions", {**CHAT, "steering": {"features": [{"index": 2**70, "strength": 1}]}}, 400),
    ("POST", "/v1/completions", {**TEXT, "max_tokens": HUGE}, 400),
    ("POST", "/v1/completions", {**TEXT, "seed": 2**64}, 400),
    ("POST", "/v1/completions", {**TEXT, "best_of": 2**70}, 400),
    ("POST", "/v1/embeddings", {**EMBED, "dimensions": 2**70}, 400),
    # OpenAI's spec says integer: strings and fractions are refused, not coerced
    ("POST", "/v1/chat/completions", {**CHAT, "max_tokens": "4"}, 400),
    ("POST", "/v1/chat/completions", {**CHAT, "max_tokens": 4.5}, 400),
    ("POST", "/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400),
    ("POST", "/v1/chat/completions", {**CHAT, "seed": "7"}, 400),
    ("POST", "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": "3"}, 400),
    ("POST", "/v1/completions", {**TEXT, "logprobs": "2"}, 400),
    ("POST", "/v1/chat/completions", {**CHAT, "n": "1"}, 400),
    # lone surrogates: not Unicode text, used to fail deep in the transport
    ("POST", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\ud800"}]}, 400),
    ("POST", "/v1/chat/completions", {**CHAT, "model": "tiny\udfff"}, 400),
    ("POST", "/v1/completions", {**TEXT, "prompt": "a\ud800b"}, 400),
    ("POST", "/v1/embeddings", {**EMBED, "input": ["fine", "\udc00"]}, 400),
    ("POST", "/v1/chat/completions", {**CHAT, "stop": ["\ud800"]}, 400),
    # logit_bias
    ("POST", "/v1/chat/completions", {**CHAT, "logit_bias": {"abc": 1}}, 400),
    ("POST", "/v1/chat/completions", {**CHAT, "logit_bias": {"-5": 1}}, 400),
    ("POST", "/v1/chat/completions", {**CHAT, "logit_bias": {"99999999999999999999": 1}}, 400),
    ("POST", "/v1/chat/completions", {**CHAT, "logit_bias": {"5": "up"}}, 400),
    ("POST", "/v1/chat/completions", {**CHAT, "logit_bias": 5}, 400),
    ("POST", "/v1/completions", {**TEXT, "logit_bias": {LONG: 1}}, 400),
    # other shapes
    ("POST", "/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400),
    ("POST", "/v1/chat/completions", {**CHAT, "steering": {"features": [{"index": 1, "strength": float("inf")}]}},
     400),
    ("POST", "/v1/chat/completions", {**CHAT, "stream": "maybe"}, 400),
    ("POST", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, 400),
    ("POST", "/v1/chat/completions", {**CHAT, "model": LONG}, 400),
    ("POST", "/v1/chat/completions", [CHAT], 400),
    ("POST", "/v1/chat/completions", "{not json", 400),
    ("POST", "/v1/embeddings", {**EMBED, "encoding_format": "hex"}, 400),
    # too big
    ("POST", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": OVER_LIMIT}]}, 413),
    ("POST", "/v1/completions", {**TEXT, "prompt": OVER_LIMIT}, 413),
    # unknown paths and wrong methods
    ("GET", "/v1/nope", None, 404),
    ("POST", "/v1/chat", CHAT, 404),
    ("GET", f"/v1/{LONG}", None, 404),
    ("GET", "/v1/chat/completions", None, 405),
    ("DELETE", "/v1/models", None, 405),
    ("PUT", "/v1/embeddings", EMBED, 405),
    ("GET", "/v1/models/no-such-model", None, 404),
    ("GET", "/v1/models/tiny:no-such-profile", None, 404),
]

API_CASES = [
    # load parameters are checked before anything is unloaded
    ("POST", "/api/models/tiny/load?dtype=bogus", None, 422),
    ("POST", "/api/models/tiny/load?quantization=q3", None, 422),
    ("POST", "/api/models/tiny/load?dtype=float32&quantization=Q99", None, 422),
    ("POST", f"/api/models/tiny/load?dtype={LONG}", None, 422),
    ("POST", "/api/models/no-such-model/load", None, 404),
    ("POST", "/api/models/no-such-model/unload", None, 404),
    ("POST", "/api/saes/no-such-sae/attach", None, 404),
    ("POST", "/api/saes/no-such-sae/detach", None, 404),
    # active steering
    ("PUT", "/api/steering", {**STEER, "mode": "sideways"}, 422),
    ("PUT", "/api/steering", {**STEER, "units": "parsecs"}, 422),
    ("PUT", "/api/steering", {"features": "all"}, 422),
    ("PUT", "/api/steering", {"features": [{"index": 1}]}, 422),
    ("PUT", "/api/steering", STEER, 400),  # no SAE attached
    ("PUT", "/api/steering", {"features": [{"index": 1, "strength": 1.0, "x": "\ud800"}]}, 400),
    ("PUT", "/api/steering", {"features": [{"index": 1, "strength": OVER_LIMIT}]}, 413),
    ("POST", "/api/steering/compare", {**STEER, "prompt": "hi", "max_tokens": 0}, 422),
    ("POST", "/api/steering/compare", {**STEER, "prompt": ""}, 422),
    # labels
    ("POST", "/api/saes/tiny-sae/labels/import",
     {"content": json.dumps([{"index": 1, "description": "a"}, {"index": 1, "description": "b"}])}, 422),
    ("POST", "/api/saes/tiny-sae/labels/import", {"content": "index,description\n7,x\n7,y\n"}, 422),
    ("POST", "/api/saes/tiny-sae/labels/import", {"content": json.dumps([{"index": LONG, "description": "a"}])},
     422),
    ("POST", "/api/saes/tiny-sae/labels/import", {"content": json.dumps([{"index": 999, "description": "a"}])}, 422),
    ("POST", "/api/saes/tiny-sae/labels/import", {"content": "[{\"index\": 1, \"description\": \"\\ud800\"}]"},
     422),
    ("POST", "/api/saes/tiny-sae/labels/import", {"content": "\ud800"}, 400),
    ("POST", "/api/saes/no-such-sae/labels/import", {"content": "index,description\n1,x\n"}, 404),
    # profiles
    ("POST", "/api/profiles", {**PROFILE, "name": "bad name!"}, 422),
    ("POST", "/api/profiles", {**PROFILE, "features": [{"index": -1, "strength": 1.0}]}, 422),
    ("POST", "/api/profiles", {**PROFILE, "features": [{"index": 2**70, "strength": 1.0}]}, 422),
    ("POST", "/api/profiles", {**PROFILE, "features": [{"index": 64, "strength": 1.0}]}, 400),  # past d_sae
    ("POST", "/api/profiles", {**PROFILE, "features": [{"index": 1, "strength": 1e300}]}, 422),
    ("POST", "/api/profiles", {**PROFILE, "model": "no-such-model"}, 404),
    ("POST", "/api/profiles", {**PROFILE, "name": "calm"}, 409),
    ("POST", "/api/profiles", {**PROFILE, "description": "\ud800"}, 400),
    ("PUT", "/api/profiles/calm", {**PROFILE, "mode": "sideways"}, 422),
    ("PUT", "/api/profiles/calm", {**PROFILE, "features": [{"index": 2**64, "strength": 1.0}]}, 422),
    ("DELETE", "/api/profiles/no-such-profile", None, 404),
    ("POST", "/api/profiles/no-such-profile/activate", None, 404),
    ("POST", "/api/profiles/import", {}, 422),
    ("POST", "/api/profiles/import", {"version": "9", "name": "x"}, 422),
    ("POST", "/api/profiles/import", {"version": "1.0", "name": "x", "features": [{"index": 2**70, "strength": 1}]},
     422),
    # monitoring
    ("POST", "/api/monitoring/configure", {"top_k": 0}, 422),
    ("POST", "/api/monitoring/configure", {"top_k": 2**70}, 422),
    ("POST", "/api/monitoring/configure", {"features": [-1]}, 422),
    ("POST", "/api/monitoring/configure", {"features": [2**70]}, 422),
    ("POST", "/api/monitoring/statistics/top", {"n": 0}, 422),
    ("POST", "/api/monitoring/statistics/top", {"by": "median"}, 422),
    ("POST", "/api/inspect", {"text": ""}, 422),
    ("GET", "/api/monitoring/history?page=1e20", None, 422),
    ("GET", "/api/monitoring/history?page=100000000000000000000", None, 422),
    ("GET", "/api/monitoring/history?page_size=0", None, 422),
    ("GET", "/api/monitoring/history?since=yesterday", None, 422),
    ("DELETE", "/api/monitoring/history?older_than_days=1e308", None, 422),
    ("DELETE", "/api/monitoring/history?older_than_days=nan", None, 422),
    ("DELETE", "/api/monitoring/history?older_than_days=-1", None, 422),
    ("GET", "/api/monitoring/history/no-such-request", None, 404),
    # downloads
    ("GET", "/api/downloads/99999999999999999999999", None, 404),
    ("POST", "/api/models/download", {"repo_id": ""}, 422),
    # unknown paths, wrong methods, bad bodies
    ("GET", "/api/nope", None, 404),
    ("POST", "/api/models/tiny/explode", None, 404),
    ("PATCH", "/api/models", None, 405),
    ("GET", "/api/steering/compare", None, 405),
    ("DELETE", "/api/monitoring/configure", None, 405),
    ("PUT", "/api/steering", "{not json", 400),
]


def request(client, method: str, path: str, body: Any):
    if body is None:
        return client.generic(method, path)
    return client.generic(method, path, body_of(body), content_type="application/json")


def assert_shape(response, path: str) -> dict:
    data = response.json()
    if path.startswith("/v1/"):
        assert set(data) == {"error"}, data
        error = data["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error" and error["message"]
    else:
        assert set(data) == {"success", "data", "error"} and data["success"] is False and data["data"] is None
        assert set(data["error"]) == {"code", "message", "details"} and data["error"]["code"].isupper()
        assert data["error"]["message"]
    return data


@pytest.mark.parametrize("method,path,body,status", V1_CASES + API_CASES,
                         ids=[f"{m} {p[:60]} #{n}" for n, (m, p, *_rest) in enumerate(V1_CASES + API_CASES)])
def test_bad_input_is_a_documented_4xx_and_changes_nothing(client, method, path, body, status):
    before = snapshot()
    response = request(client, method, path, body)
    assert response.status_code == status, response.content[:500]
    assert response["Content-Type"].startswith("application/json")
    assert_shape(response, path)
    text = response.content.decode()
    assert len(text) < 4000
    for value in [*strings_in(body if not isinstance(body, str) else [body]), path]:
        if len(value) > ECHO_LIMIT:
            assert value[:ECHO_LIMIT + 1] not in text
    assert snapshot() == before


def test_the_battery_is_big_enough():
    assert len(V1_CASES) + len(API_CASES) >= 60


def test_a_wrong_method_keeps_the_allow_header(client):
    response = client.get("/v1/chat/completions")
    assert response.status_code == 405 and response["Allow"] == "POST"
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_too_large_names_the_limit(client):
    response = client.post("/api/profiles", json.dumps({**PROFILE, "description": OVER_LIMIT}),
                           content_type="application/json")
    assert response.status_code == 413
    assert str(settings.DATA_UPLOAD_MAX_MEMORY_SIZE) in response.json()["error"]["message"]
    assert response.json()["error"]["code"] == "REQUEST_TOO_LARGE"


def test_a_lone_surrogate_names_its_field(client):
    body = {**CHAT, "messages": [{"role": "user", "content": "fine"}, {"role": "user", "content": "\ud800"}]}
    response = client.post("/v1/chat/completions", json.dumps(body), content_type="application/json")
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages.1.content"


def test_paired_surrogates_are_ordinary_text(client):
    # An emoji arrives as a surrogate pair in JSON: valid text, which reaches the (absent) inference process.
    body = {**CHAT, "messages": [{"role": "user", "content": "\U0001f600"}]}
    response = client.post("/v1/chat/completions", json.dumps(body), content_type="application/json")
    assert response.status_code == 503


def test_retrieve_model_is_the_list_entry(client):
    listed = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    for model_id in ("tiny", "tiny:calm"):
        response = client.get(f"/v1/models/{model_id}")
        assert response.status_code == 200 and response.json() == listed[model_id]
    missing = client.get("/v1/models/tiny:nope").json()["error"]
    assert missing["code"] == "model_not_found" and missing["param"] == "model"


def test_logit_bias_and_strict_ints_reach_the_engine_as_sent(client):
    from serving.protocol import ChatCompletionRequest

    request = ChatCompletionRequest.model_validate({**CHAT, "max_tokens": 4, "seed": -(2**63),
                                                    "logit_bias": {"7": 250, "9": -3.5}})
    params = request.params()
    assert params["logit_bias"] == [[7, 100.0], [9, -3.5]]  # clamped like OpenAI; pairs for msgpack
    assert params["max_tokens"] == 4 and params["seed"] == -(2**63)
