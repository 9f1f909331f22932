"""Conditions in profiles and the active steering, and steering vectors, on the live stack (test tier, real
daphne + inference processes): a profile whose condition never holds leaves the text unsteered, one whose
condition always holds steers it as the plain feature does; a stored vector steers per request and as the
active steering; bad input gets a 4xx and nothing changes."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from engine.control_vector_files import ControlVector, write_control_vector_gguf
from tests.live.conftest import load_tiny

SAE = "tiny-llama-layer_2"
CAT = 7
PROMPT = "The dog sat on the"


@pytest.fixture(scope="module")
def url(live_stack):
    load_tiny(live_stack)
    response = httpx.post(f"{live_stack.url}/api/saes/{SAE}/attach", timeout=300)
    assert response.status_code == 200, response.text
    yield live_stack.url
    httpx.delete(f"{live_stack.url}/api/steering", timeout=60)


def complete(url, steering=None, model="tiny-llama") -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    if steering is not None:
        body["steering"] = steering
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def save_profile(url, name: str, when: dict, *, replace: bool = False) -> None:
    body = {"name": name, "sae": SAE, "features": [{"index": CAT, "strength": 40.0, "when": when}],
            "abort_when": [{"index": 3, "above": 1e6}]}
    response = (httpx.put(f"{url}/api/profiles/{name}", json=body, timeout=60) if replace
                else httpx.post(f"{url}/api/profiles", json=body, timeout=60))
    assert response.status_code == 200, response.text


def test_an_activated_profiles_condition_gates_its_feature(url):
    plain = complete(url)
    steered = complete(url, {"features": [{"index": CAT, "strength": 40.0}]})
    assert steered != plain
    save_profile(url, "live-gated", {"index": CAT, "above": 1e6})  # never holds
    assert httpx.post(f"{url}/api/profiles/live-gated/activate", timeout=60).status_code == 200
    active = httpx.get(f"{url}/api/steering", timeout=60).json()["data"]
    assert active["features"][0]["when"] == {"index": CAT, "above": 1e6} and active["abort_when"]
    assert complete(url) == plain
    assert complete(url, model="tiny-llama:live-gated") == plain
    save_profile(url, "live-gated", {"index": CAT, "below": 1e6}, replace=True)  # always holds
    assert httpx.post(f"{url}/api/profiles/live-gated/activate", timeout=60).status_code == 200
    assert complete(url) == steered
    assert complete(url, model="tiny-llama:live-gated") == steered
    refused = httpx.put(f"{url}/api/steering", json={"features": [
        {"index": CAT, "strength": 1.0, "when": {"index": CAT, "above": 2.0, "below": 1.0}}]}, timeout=60)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "VALIDATION_ERROR"
    assert complete(url) == steered  # the profile's steering still applies
    assert httpx.delete(f"{url}/api/steering", timeout=60).status_code == 200


def test_a_stored_vector_steers_per_request_and_as_the_active_steering(url):
    plain = complete(url)
    width = httpx.get(f"{url}/api/saes/{SAE}", timeout=60).json()["data"]["d_in"]  # the hidden size
    direction = (8.0 * np.random.default_rng(3).standard_normal(width)).astype(np.float32)
    gguf = write_control_vector_gguf(ControlVector(model_hint="llama", directions={1: direction}))
    stored = httpx.post(f"{url}/api/vectors/import", json={"name": "live-push", "format": "gguf",
                                                           "content": base64.b64encode(gguf).decode()}, timeout=60)
    assert stored.status_code == 200, stored.text
    by_value = complete(url, {"vectors": [{"layer": 1, "vector": direction.tolist(), "strength": 1.5}]})
    assert by_value != plain
    assert complete(url, {"vectors": [{"name": "live-push", "strength": 1.5}]}) == by_value
    assert httpx.put(f"{url}/api/steering", json={"vectors": [{"name": "live-push", "strength": 1.5}]},
                     timeout=60).status_code == 200
    assert complete(url) == by_value
    wrong = httpx.post(f"{url}/v1/completions", json={"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 4,
                                                      "steering": {"vectors": [{"layer": 1, "vector": [1.0] * 3}]}},
                       timeout=60)
    assert wrong.status_code == 400 and f"expects {width}" in wrong.json()["error"]["message"]
    assert httpx.delete(f"{url}/api/steering", timeout=60).status_code == 200
    assert complete(url) == plain
