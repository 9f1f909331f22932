"""Conditions in the active steering (PUT /api/steering) and in profiles (create, export/import, activate):
a real inference process (in a thread) serves the test tier. A condition that never holds leaves the text
unsteered, one that always holds steers it as the plain feature does; bad conditions are refused with a
4xx and nothing changes; a restarted inference process applies the saved conditions again."""

from __future__ import annotations

import asyncio
import json

import pytest

from inference.process import InferenceWorker
from profiles.models import Profile
from steering.models import SteeringState

pytestmark = pytest.mark.django_db(transaction=True)

CAT = 7  # the test tier's ' cat' feature
CHAT = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 12, "temperature": 0}
NEVER = {"index": CAT, "above": 1e6}  # the activation never gets there
ALWAYS = {"index": CAT, "below": 1e6}  # an activation (>= 0) is always below it


def send(client, method, path, body):
    return getattr(client, method)(path, json.dumps(body), content_type="application/json")


def chat(client, model) -> str:
    response = send(client, "post", "/v1/chat/completions", {**CHAT, "model": model})
    assert response.status_code == 200, response.content
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture
def serving(client, tiny_catalog, inference_worker):
    model, sae = tiny_catalog
    assert client.post(f"/api/models/{model.name}/load").status_code == 200
    assert client.post(f"/api/saes/{sae.name}/attach").status_code == 200
    return model, sae


def steer(client, *, when=None, abort_when=()):
    feature = {"index": CAT, "strength": 40.0, **({"when": when} if when else {})}
    response = send(client, "put", "/api/steering", {"features": [feature], "abort_when": list(abort_when)})
    assert response.status_code == 200, response.content
    return response.json()["data"]


def test_a_condition_in_the_active_steering_gates_the_feature(client, serving):
    model, _ = serving
    plain = chat(client, model.name)
    steer(client)
    steered = chat(client, model.name)
    assert steered != plain
    data = steer(client, when=NEVER, abort_when=[{"index": 3, "above": 1e6}])
    assert data["features"] == [{"index": CAT, "strength": 40.0, "when": {"index": CAT, "above": 1e6}}]
    assert data["abort_when"] == [{"index": 3, "above": 1e6}]
    assert chat(client, model.name) == plain
    steer(client, when=ALWAYS)
    assert chat(client, model.name) == steered
    current = client.get("/api/steering").json()["data"]
    assert current["features"][0]["when"] == {"index": CAT, "below": 1e6} and current["abort_when"] == []


BAD = [
    ({"features": [{"index": CAT, "strength": 1.0, "when": {"sae": "no-such-sae", "index": 1, "above": 1.0}}]},
     400, "SAE_NOT_ATTACHED"),
    ({"features": [{"index": CAT, "strength": 1.0, "when": {"index": 10**6, "above": 1.0}}]},
     400, "INVALID_FEATURE_INDEX"),
    ({"features": [{"index": CAT, "strength": 1.0, "when": {"index": 1}}]}, 422, "VALIDATION_ERROR"),
    ({"features": [{"index": CAT, "strength": 1.0, "when": {"index": 1, "above": 2.0, "below": 1.0}}]},
     422, "VALIDATION_ERROR"),
    ({"features": [{"index": CAT, "strength": 1.0, "when": {"index": 1, "above": 1.0}}], "mode": "clamp"},
     422, "VALIDATION_ERROR"),
    ({"features": [], "abort_when": [{"index": 10**6, "above": 1.0}]}, 400, "INVALID_FEATURE_INDEX"),
]


def test_bad_conditions_are_refused_and_nothing_changes(client, serving):
    before = steer(client, when=NEVER)
    for body, status, code in BAD:
        response = send(client, "put", "/api/steering", body)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), body
        assert response.json()["success"] is False
    # NaN is not JSON; Python's parser takes it, the schema refuses it.
    response = client.put("/api/steering", '{"features": [{"index": 7, "strength": 1, "when": {"index": 1, '
                          '"above": NaN}}]}', content_type="application/json")
    assert 400 <= response.status_code < 500 and response.json()["success"] is False
    after = client.get("/api/steering").json()["data"]
    assert (after["features"], after["abort_when"]) == (before["features"], before["abort_when"])


def test_a_restarted_inference_process_applies_the_saved_conditions(client, serving):
    steer(client, when=NEVER, abort_when=[{"index": 3, "above": 1e6}])
    state = SteeringState.current()
    assert state.features[0]["when"] == {"index": CAT, "above": 1e6} and state.abort_when

    fresh = InferenceWorker(channel_layer=None, channel_name="restart-check")
    runtime = fresh.calls.runtime
    try:
        asyncio.run(fresh.calls.restore_desired_state())
        conditions = runtime.active_conditions
        assert conditions is not None and runtime.active_label == "active"
        assert [c.index for c in conditions.conditions.abort_when] == [3]
        assert [(f.index, f.when.above) for f in conditions.conditions.features] == [(CAT, 1e6)]
    finally:
        runtime.unload()


def profile_body(**extra):
    return {"name": "gated", "sae": "tiny-test-sae", "features": [{"index": CAT, "strength": 40.0, **extra}]}


def test_a_profile_carries_its_conditions_through_export_import_and_activation(client, serving):
    model, sae = serving
    plain = chat(client, model.name)
    body = {**profile_body(when=NEVER), "sae": sae.name, "abort_when": [{"index": 3, "below": 0.5, "above": 0.1}]}
    created = send(client, "post", "/api/profiles", body)
    assert created.status_code == 200, created.content
    exported = client.get("/api/profiles/gated/export").json()
    assert exported["features"][0]["when"] == {"index": CAT, "above": 1e6}
    assert exported["abort_when"] == [{"index": 3, "above": 0.1, "below": 0.5}]

    assert client.delete("/api/profiles/gated").status_code == 200
    imported = send(client, "post", "/api/profiles/import", exported)
    assert imported.status_code == 200, imported.content
    assert imported.json()["data"]["features"][0]["when"] == {"index": CAT, "above": 1e6}

    assert client.post("/api/profiles/gated/activate").status_code == 200
    state = SteeringState.current()
    assert state.features[0]["when"] == {"index": CAT, "above": 1e6} and state.source_profile == "gated"
    assert chat(client, model.name) == plain  # the condition never holds
    always = send(client, "put", "/api/profiles/gated", {**body, "features": [
        {"index": CAT, "strength": 40.0, "when": ALWAYS}], "abort_when": []})
    assert always.status_code == 200, always.content
    assert client.post("/api/profiles/gated/activate").status_code == 200
    assert chat(client, model.name) != plain


def test_a_single_sae_profile_file_without_conditions_still_imports(client, serving):
    _, sae = serving
    old = {"version": "1.0", "name": "old-style", "sae": {"repo_id": sae.repo_id, "layer": sae.layer},
           "features": [{"index": CAT, "strength": 2.0, "label": "cat"}]}
    response = send(client, "post", "/api/profiles/import", old)
    assert response.status_code == 200, response.content
    assert response.json()["data"]["abort_when"] == [] and "when" not in response.json()["data"]["features"][0]


def test_bad_profile_conditions_are_refused_whole(client, serving):
    _, sae = serving
    for when, code in (({"index": 10**6, "above": 1.0}, "INVALID_FEATURE_INDEX"), ({"index": 1}, "VALIDATION_ERROR")):
        response = send(client, "post", "/api/profiles", {**profile_body(when=when), "sae": sae.name})
        assert 400 <= response.status_code < 500 and response.json()["error"]["code"] == code, response.content
    assert not Profile.objects.filter(name="gated").exists()


def test_the_steering_pages_condition_input_applies_the_condition(client, serving):
    model, _ = serving
    plain = chat(client, model.name)
    response = client.post("/steering/apply", {"index": ["7"], "strength": ["40"], "when": ["#7 > 1000000"],
                                               "units": "raw", "mode": "additive"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200 and "#7 when #7 &gt; 1e+06" in response.content.decode()
    assert SteeringState.current().features == [{"index": CAT, "strength": 40.0, "when": {"index": CAT, "above": 1e6}}]
    assert chat(client, model.name) == plain
    client.post("/steering/apply", {"index": ["7"], "strength": ["40"], "when": [""], "units": "raw"},
                HTTP_HX_REQUEST="true")
    assert chat(client, model.name) != plain  # without the condition the feature steers
