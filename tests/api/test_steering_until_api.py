"""max_steered_tokens and until_concept through /v1 inline `steering`, the compare, the preset, and their refusals
(a real inference process in a thread serves the test tier; the engine's own tests check the tokens by hand)."""

from __future__ import annotations

import json
import shutil

import pytest

from steering.models import SparseAutoencoder, SteeringState
from steering.steering_services import steering_state_message

pytestmark = pytest.mark.django_db(transaction=True)

CAT = 7  # the test tier's ' cat' feature
CHAT = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 12, "temperature": 0}
FEATURE = [{"index": CAT, "strength": 40.0}]


def post(client, path, body):
    return client.post(path, json.dumps(body), content_type="application/json")


def chat(client, model, steering=None):
    body = {**CHAT, "model": model, "logprobs": True, **({"steering": steering} if steering is not None else {})}
    response = post(client, "/v1/chat/completions", body)
    assert response.status_code == 200, response.content
    return [t["token"] for t in response.json()["choices"][0]["logprobs"]["content"]]


@pytest.fixture
def serving(client, tiny_catalog, inference_worker, tmp_path):
    model, sae = tiny_catalog
    # A recommendation that steers the first 3 tokens only (the demo's says until_concept and 15).
    folder = tmp_path / "sae"
    shutil.copytree(sae.local_path, folder)
    (folder / "steering.json").write_text(json.dumps({
        "mode": "additive", "positions": "all", "units": "raw", "layers": [], "direction": "decoder",
        "recommended_strength": 40.0, "strength_range": [1.0, 80.0], "max_steered_tokens": 3}))
    SparseAutoencoder.objects.filter(pk=sae.pk).update(local_path=str(folder))
    assert client.post(f"/api/models/{model.name}/load").status_code == 200
    assert client.post(f"/api/saes/{sae.name}/attach").status_code == 200
    return model, sae


def test_v1_inline_compare_and_preset_steer_only_the_first_tokens(client, serving):
    model, _ = serving
    plain, full = chat(client, model.name), chat(client, model.name, {"features": FEATURE})
    capped = chat(client, model.name, {"features": FEATURE, "max_steered_tokens": 3})
    assert capped[:3] == full[:3] and capped != full and full[:3] != plain[:3]
    assert chat(client, model.name, {"features": FEATURE, "preset": "recommended"}) == capped
    compared = post(client, "/api/steering/compare", {"prompt": "Hello!", "features": FEATURE, "max_tokens": 12,
                                                       "max_steered_tokens": 3})
    assert compared.status_code == 200, compared.content
    assert compared.json()["data"]["steered"]["text"] == "".join(capped)
    # until_concept on an SAE without concept tokens stops at the feature's top logit-lens tokens: accepted.
    assert len(chat(client, model.name, {"features": FEATURE, "until_concept": True})) == 12


@pytest.mark.parametrize("value", [{"max_steered_tokens": 0}, {"max_steered_tokens": -1},
                                   {"max_steered_tokens": 10**9}, {"max_steered_tokens": 2.5},
                                   {"max_steered_tokens": "3"}, {"max_steered_tokens": True},
                                   {"until_concept": "yes"}, {"until_concept": 1}])
def test_bad_values_are_refused_on_v1_and_on_the_compare(client, serving, value):
    model, _ = serving
    field = next(iter(value))
    response = post(client, "/v1/chat/completions", {**CHAT, "model": model.name,
                                                      "steering": {"features": FEATURE, **value}})
    assert response.status_code == 400, response.content
    assert response.json()["error"]["param"].startswith(f"steering.{field}")
    compared = post(client, "/api/steering/compare", {"prompt": "Hi", "features": FEATURE, **value})
    assert compared.status_code == 422 and field in json.dumps(compared.json()["error"]), compared.content


def put(client, body):
    return client.put("/api/steering", json.dumps(body), content_type="application/json")


def test_until_concept_without_features_is_refused_on_v1(client, serving):
    model, _ = serving
    response = post(client, "/v1/chat/completions", {**CHAT, "model": model.name,
                                                      "steering": {"features": [], "until_concept": True}})
    assert response.status_code == 400 and "until_concept" in response.json()["error"]["message"], response.content


def test_the_active_steering_keeps_the_options_and_steers_like_v1_inline(client, serving):
    model, _ = serving
    response = put(client, {"features": FEATURE, "max_steered_tokens": 3})
    assert response.status_code == 200, response.content
    data = client.get("/api/steering").json()["data"]
    assert (data["max_steered_tokens"], data["until_concept"]) == (3, False)
    capped = chat(client, model.name, {"features": FEATURE, "max_steered_tokens": 3})
    assert chat(client, model.name) == capped != chat(client, model.name, {"features": FEATURE})
    # What a restarted inference process is sent (inference/handlers.py restore_desired_state) carries them too.
    restored = steering_state_message(SteeringState.current())
    assert (restored.max_steered_tokens, restored.until_concept) == (3, False)
    assert put(client, {"features": FEATURE, "until_concept": True}).status_code == 200
    data = client.get("/api/steering").json()["data"]
    assert (data["max_steered_tokens"], data["until_concept"]) == (None, True)
    # The preset's options are kept (the test recommendation caps at 3 tokens).
    assert put(client, {"features": FEATURE, "preset": "recommended"}).status_code == 200
    assert client.get("/api/steering").json()["data"]["max_steered_tokens"] == 3
    assert chat(client, model.name) == capped


@pytest.mark.parametrize("value", [{"max_steered_tokens": 0}, {"max_steered_tokens": 10**9},
                                   {"max_steered_tokens": "3"}, {"max_steered_tokens": True},
                                   {"until_concept": "yes"}, {"until_concept": 1}])
def test_bad_values_on_the_active_steering_are_refused_and_change_nothing(client, serving, value):
    assert put(client, {"features": FEATURE, "max_steered_tokens": 5}).status_code == 200
    before = client.get("/api/steering").json()["data"]
    refused = put(client, {"features": FEATURE, **value})
    assert refused.status_code == 422 and next(iter(value)) in json.dumps(refused.json()["error"]), refused.content
    assert client.get("/api/steering").json()["data"] == before
    if next(iter(value)) == "until_concept":  # true with nothing to stop steering: refused too
        refused = put(client, {"features": [], "until_concept": True})
        assert refused.status_code == 422 and "until_concept" in json.dumps(refused.json()["error"]), refused.content
        assert client.get("/api/steering").json()["data"] == before


def test_a_profile_keeps_the_options_through_export_import_and_activation(client, serving):
    model, sae = serving
    created = post(client, "/api/profiles", {"name": "capped", "model": model.name, "sae": sae.name,
                                             "features": FEATURE, "max_steered_tokens": 3, "until_concept": False})
    assert created.status_code == 200, created.content
    assert created.json()["data"]["max_steered_tokens"] == 3
    exported = client.get("/api/profiles/capped/export").json()
    assert (exported["max_steered_tokens"], exported["until_concept"]) == (3, False)
    assert client.delete("/api/profiles/capped").status_code == 200
    imported = post(client, "/api/profiles/import", exported)
    assert imported.status_code == 200, imported.content
    assert imported.json()["data"]["max_steered_tokens"] == 3
    capped = chat(client, model.name, {"features": FEATURE, "max_steered_tokens": 3})
    assert chat(client, f"{model.name}:capped") == capped  # per request as <model>:<profile>
    assert client.post("/api/profiles/capped/activate").status_code == 200
    assert client.get("/api/steering").json()["data"]["max_steered_tokens"] == 3
    assert chat(client, model.name) == capped
    # The pages say so: the Steering page's applied text and the Profiles table's summary.
    assert "steering the first 3 tokens" in client.get("/steering/").content.decode()
    assert "steers the first 3 tokens" in client.get("/profiles/").content.decode()
    # An old file without them still imports (no cap); a bad value is refused whole.
    old = {k: v for k, v in exported.items() if k not in ("max_steered_tokens", "until_concept")}
    assert post(client, "/api/profiles/import?replace=true", old).json()["data"]["max_steered_tokens"] is None
    bad = post(client, "/api/profiles/import?replace=true", {**exported, "max_steered_tokens": 0})
    assert bad.status_code == 422 and "max_steered_tokens" in json.dumps(bad.json()["error"]), bad.content
    assert post(client, "/api/profiles", {"name": "bad", "features": FEATURE,
                                          "until_concept": "yes"}).status_code == 422


def test_the_sweep_steers_with_the_options_and_refuses_bad_ones_before_starting(client, serving):
    from steering.models import SweepRun

    model, _ = serving
    assert post(client, "/api/steering/sweep", {"features": [{"index": CAT}], "strengths": [40.0],
                                                 "max_steered_tokens": -2}).status_code == 422
    assert SweepRun.objects.count() == 0
    response = post(client, "/api/steering/sweep", {"features": [{"index": CAT}], "strengths": [40.0],
                                                     "prompts": ["Hello!"], "max_tokens": 12, "max_steered_tokens": 3})
    assert response.status_code == 200, response.content
    point = next(p for p in response.json()["data"]["result"]["points"] if p["strength"] == 40.0)
    capped = chat(client, model.name, {"features": FEATURE, "max_steered_tokens": 3})
    assert point["outputs"][0]["text"] == "".join(capped) != "".join(chat(client, model.name, {"features": FEATURE}))


def test_the_pages_recommended_checkbox_keeps_the_options_on_apply_and_save_as_profile(client, serving):
    model, _ = serving
    form = {"index": [str(CAT)], "strength": ["40"], "units": "raw", "preset": "recommended"}
    applied = client.post("/steering/apply", form)
    assert applied.status_code == 200 and "steering the first 3 tokens" in applied.content.decode(), applied.content
    assert client.get("/api/steering").json()["data"]["max_steered_tokens"] == 3
    saved = client.post("/steering/save-profile", {**form, "profile_name": "from-page"})
    assert saved.status_code == 200, saved.content
    assert client.get("/api/profiles/from-page").json()["data"]["max_steered_tokens"] == 3
    # The Profiles page's "save the active steering" too.
    assert client.post("/profiles/from-active", {"name": "from-active"}).status_code == 200
    assert client.get("/api/profiles/from-active").json()["data"]["max_steered_tokens"] == 3


def test_the_compare_echoes_strengths_in_the_units_it_was_given(client, serving):
    """The compare's `features` are in its own `units` (as `/api/steering` reports them), not raw numbers
    beside `"units": "residual_norm"`; the steered text is the raw equivalent's."""
    model, sae = serving
    given = [{"index": CAT, "strength": 0.5}]
    compared = post(client, "/api/steering/compare", {"prompt": "Hello!", "features": given, "max_tokens": 12,
                                                       "units": "residual_norm"})
    assert compared.status_code == 200, compared.content
    data = compared.json()["data"]
    assert data["units"] == "residual_norm" and data["features"] == given
    raw = [{"index": CAT, "strength": 0.5 * sae.residual_norm}]
    assert data["steered"]["text"] == "".join(chat(client, model.name, {"features": raw}))
