"""Steering end to end on the live stack (test tier): the labelled demo features really steer."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import openai
import pytest

from tests.live.conftest import load_tiny
from tests.live.test_serve import children_by_name

CAT = 7  # the test tier's feature for the token ' cat' (engine/assets/tiny.py)
SAE = "tiny-llama-layer_2"
HELLO = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def steered_stack(live_stack):
    load_tiny(live_stack)
    response = httpx.post(f"{live_stack.url}/api/saes/{SAE}/attach", timeout=300)
    assert response.status_code == 200, response.text
    assert response.json()["data"]["status"] == "attached"
    yield live_stack
    httpx.delete(f"{live_stack.url}/api/steering", timeout=60)


@pytest.fixture
def client(steered_stack):
    return openai.OpenAI(base_url=f"{steered_stack.url}/v1", api_key="x", max_retries=0, timeout=60)


def greedy(client, **extra):
    reply = client.chat.completions.with_raw_response.create(model="tiny-llama", messages=HELLO, max_tokens=16,
                                                             temperature=0, **extra)
    return reply.parse().choices[0].message.content, reply.headers["x-millm-steering"]


def put_steering(stack, body):
    return httpx.put(f"{stack.url}/api/steering", json=body, timeout=60)


def test_steering_a_labelled_feature_makes_its_token_appear_and_clearing_restores(client, steered_stack):
    plain, label = greedy(client)
    assert label == "none" and "cat" not in plain
    response = put_steering(steered_stack, {"features": [{"index": CAT, "strength": 2.0}], "units": "residual_norm"})
    assert response.status_code == 200, response.text
    steered, label = greedy(client)
    assert label == "active" and "cat" in steered
    assert httpx.delete(f"{steered_stack.url}/api/steering", timeout=60).status_code == 200
    assert greedy(client) == (plain, "none")


def test_inline_steering_overrides_for_one_request(client, steered_stack):
    plain, _ = greedy(client)
    steered, label = greedy(client, extra_body={"steering": {"features": [{"index": CAT, "strength": 2.0}],
                                                             "units": "residual_norm"}})
    assert label == "inline" and "cat" in steered and steered != plain
    assert greedy(client)[0] == plain


def test_mixed_batch_gives_each_row_its_own_steering(steered_stack):
    variants = [None, {"features": [{"index": CAT, "strength": 80.0}]},
                {"features": [{"index": 42, "strength": 80.0}]}, {"features": [{"index": CAT, "strength": 30.0}],
                                                                  "mode": "clamp"}] * 2
    sync = openai.OpenAI(base_url=f"{steered_stack.url}/v1", api_key="x", max_retries=0)

    def body(steering):
        return {"extra_body": {"steering": steering}} if steering else {}

    alone = [sync.chat.completions.create(model="tiny-llama", messages=HELLO, max_tokens=12, temperature=0,
                                          **body(v)).choices[0].message.content for v in variants]

    async def together():
        client = openai.AsyncOpenAI(base_url=f"{steered_stack.url}/v1", api_key="x", max_retries=0, timeout=120)
        replies = await asyncio.gather(*(client.chat.completions.create(
            model="tiny-llama", messages=HELLO, max_tokens=12, temperature=0, **body(v)) for v in variants))
        return [r.choices[0].message.content for r in replies]

    assert asyncio.run(together()) == alone
    assert len(set(alone)) >= 3  # the variants really differ


def test_profile_by_model_name_and_activation(client, steered_stack):
    profile = {"name": "cats", "model": "tiny-llama", "sae": SAE, "features": [{"index": CAT, "strength": 80.0}]}
    assert httpx.post(f"{steered_stack.url}/api/profiles", json=profile).status_code == 200
    by_name = client.chat.completions.with_raw_response.create(model="tiny-llama:cats", messages=HELLO,
                                                               max_tokens=16, temperature=0)
    assert by_name.headers["x-millm-steering"] == "profile:cats"
    assert "cat" in by_name.parse().choices[0].message.content
    assert httpx.post(f"{steered_stack.url}/api/profiles/cats/activate", timeout=60).status_code == 200
    text, label = greedy(client)
    assert label == "profile:cats" and "cat" in text
    assert httpx.post(f"{steered_stack.url}/api/profiles/cats/deactivate", timeout=60).status_code == 200
    assert greedy(client)[1] == "none"


def test_compare_endpoint_answers_both_ways(steered_stack):
    response = httpx.post(f"{steered_stack.url}/api/steering/compare", timeout=120, json={
        "prompt": "Hello!", "max_tokens": 16, "features": [{"index": CAT, "strength": 2.0}],
        "units": "residual_norm"})
    data = response.json()["data"]
    assert "cat" in data["steered"]["text"] and "cat" not in data["unsteered"]["text"]


@pytest.mark.parametrize("body,status,code", [
    ({"features": [{"index": 256, "strength": 1.0}]}, 400, "INVALID_FEATURE_INDEX"),
    ({"features": [{"index": -1, "strength": 1.0}]}, 400, "INVALID_FEATURE_INDEX"),
    ({"features": [{"index": 1, "strength": 5000.0}]}, 422, "VALIDATION_ERROR"),
    ({"features": [{"index": 1, "strength": "strong"}]}, 422, "VALIDATION_ERROR"),
    ({"features": [{"index": 1, "strength": 1.0}], "mode": "multiply"}, 422, "VALIDATION_ERROR"),
    ({"features": [{"index": 1, "strength": 1.0}, {"index": 1, "strength": 2.0}]}, 422, "VALIDATION_ERROR"),
    ({"features": [{"index": 1, "strength": 1.0}], "units": "max_activation"}, 422, "VALIDATION_ERROR"),
])
def test_bad_steering_is_refused_and_changes_nothing(steered_stack, body, status, code):
    before = httpx.get(f"{steered_stack.url}/api/steering").json()["data"]
    response = put_steering(steered_stack, body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert httpx.get(f"{steered_stack.url}/api/steering").json()["data"] == before


def test_nan_inline_strength_is_a_400(steered_stack):
    body = ('{"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}], '
            '"steering": {"features": [{"index": 1, "strength": NaN}]}}')
    response = httpx.post(f"{steered_stack.url}/v1/chat/completions", content=body,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "steering.features.0.strength"


def test_active_steering_survives_an_inference_restart(client, steered_stack):
    put_steering(steered_stack, {"features": [{"index": CAT, "strength": 80.0}]})
    steered, _ = greedy(client)
    inference = children_by_name(steered_stack)["inference"]
    os.kill(inference.pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        health = httpx.get(f"{steered_stack.url}/api/health").json()["data"]["inference"]
        if health["up"] and health.get("pid") != inference.pid and health.get("steering") == "active":
            break
        time.sleep(0.3)
    assert health.get("attached_sae") == SAE and health.get("loaded_model") == "tiny-llama"
    assert greedy(client) == (steered, "active")


def test_active_steering_keeps_max_steered_tokens_through_an_inference_restart(client, steered_stack):
    feature = [{"index": CAT, "strength": 80.0}]
    assert put_steering(steered_stack, {"features": feature, "max_steered_tokens": 3}).status_code == 200
    capped, _ = greedy(client, extra_body={"steering": {"features": feature, "max_steered_tokens": 3}})
    full, _ = greedy(client, extra_body={"steering": {"features": feature}})
    assert greedy(client) == (capped, "active") and capped != full
    inference = children_by_name(steered_stack)["inference"]
    os.kill(inference.pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        health = httpx.get(f"{steered_stack.url}/api/health").json()["data"]["inference"]
        if health["up"] and health.get("pid") != inference.pid and health.get("steering") == "active":
            break
        time.sleep(0.3)
    assert greedy(client) == (capped, "active")  # the restarted process was sent the cap too
    httpx.delete(f"{steered_stack.url}/api/steering", timeout=60)
