"""Several SAEs attached at once through the API, with a real inference process (in a thread) serving the
test tier's two SAEs: attach both, status and /api/saes say so, features of both are steered at once (active
steering, compare, /v1 inline), detaching one keeps the other, and bad addresses are refused with a 4xx and
nothing applied."""

from __future__ import annotations

import json
import shutil

import pytest

from engine.calibration_file import CalibrationRecipe, write_calibration
from steering.models import SaeStatus, SparseAutoencoder
from steering.sae_services import sae_set_status

pytestmark = pytest.mark.django_db(transaction=True)

CAT = 7  # ' cat' in both test-tier SAEs
CHAT = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 12, "temperature": 0}


def send(client, method, path, body):
    return getattr(client, method)(path, json.dumps(body), content_type="application/json")


def chat(client, model, **extra) -> str:
    response = send(client, "post", "/v1/chat/completions", {**CHAT, "model": model, **extra})
    assert response.status_code == 200, response.content
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture
def serving(two_saes_serving):
    return two_saes_serving


def test_both_saes_attach_and_the_status_names_them_the_first_as_default(client, serving):
    model, late, early = serving
    inference = client.get("/api/health").json()["data"]["inference"]
    assert inference["attached_sae"] == late.name
    assert [(s["name"], s["layer"]) for s in inference["attached_saes"]] == [(late.name, 2), (early.name, 1)]
    saes = {s["name"]: s for s in client.get("/api/saes").json()["data"]}
    assert saes[late.name]["status"] == saes[early.name]["status"] == SaeStatus.ATTACHED
    # Both are attached again after a restart, in this order (the default first).
    assert saes[late.name]["desired_attached"] and saes[early.name]["desired_attached"]
    assert [s.name for s in SparseAutoencoder.objects.filter(desired_attached=True).order_by("attached_order")] == [
        late.name, early.name]
    statistics = client.get(f"/api/monitoring/statistics?sae={early.name}")
    assert statistics.status_code == 200 and statistics.json()["data"]["sae"] == early.name
    # A request's own features of the SAE it names.
    body = {**CHAT, "model": model.name, "return_features": {"sae": early.name, "top_k": 3, "positions": "prompt"}}
    response = send(client, "post", "/v1/chat/completions", body)
    assert response.status_code == 200, response.content
    returned = response.json()["millm_features"]
    assert returned["sae"] == early.name and returned["tokens"]
    gone = send(client, "post", "/v1/chat/completions", {**body, "return_features": {"sae": "gone", "top_k": 3}})
    assert gone.status_code == 400 and gone.json()["error"]["code"] == "sae_not_attached"


def test_features_of_both_saes_steer_at_once_and_detaching_one_keeps_the_other(client, serving):
    model, late, early = serving
    plain = chat(client, model.name)
    features = [{"index": CAT, "strength": 40.0}, {"sae": early.name, "index": 42, "strength": 20.0}]
    response = send(client, "put", "/api/steering", {"features": features})
    assert response.status_code == 200, response.content
    assert response.json()["data"]["features"] == [{"index": CAT, "strength": 40.0},
                                                   {"index": 42, "strength": 20.0, "sae": early.name}]
    steered = chat(client, model.name)
    assert steered != plain
    # The same steering inline (/v1 extra_body) on a clean slate gives the same text.
    assert client.delete("/api/steering").status_code == 200
    assert chat(client, model.name, steering={"features": features}) == steered
    assert chat(client, model.name, steering={"features": features[1:]}) != plain  # the early SAE's alone steers
    late_only = chat(client, model.name, steering={"features": features[:1]})
    # Detach the early SAE: the late one stays attached and steers alone.
    assert client.post(f"/api/saes/{early.name}/detach").status_code == 200
    inference = client.get("/api/health").json()["data"]["inference"]
    assert [s["name"] for s in inference["attached_saes"]] == [late.name]
    assert SparseAutoencoder.objects.get(name=late.name).status == SaeStatus.ATTACHED
    assert chat(client, model.name, steering={"features": features[:1]}) == late_only
    refused = send(client, "post", "/v1/chat/completions", {**CHAT, "model": model.name,
                                                             "steering": {"features": features}})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "sae_not_attached"


BAD = [
    ({"features": [{"sae": "no-such-sae", "index": CAT, "strength": 1.0}]}, 400, "SAE_NOT_ATTACHED"),
    ({"features": [{"sae": "{early}", "index": 256, "strength": 1.0}]}, 400, "INVALID_FEATURE_INDEX"),
    ({"features": [{"index": CAT, "strength": 1.0,
                    "when": {"sae": "{early}", "index": 300, "above": 1.0}}]}, 400, "INVALID_FEATURE_INDEX"),
    ({"features": [], "abort_when": [{"sae": "gone", "index": 3, "above": 1.0}]}, 400, "SAE_NOT_ATTACHED"),
]


@pytest.mark.parametrize("body, status, code", BAD)
def test_bad_addresses_are_refused_and_nothing_changes(client, serving, body, status, code):
    model, late, early = serving
    assert send(client, "put", "/api/steering", {"features": [{"index": CAT, "strength": 4.0}]}).status_code == 200
    before = client.get("/api/steering").json()["data"]
    body = json.loads(json.dumps(body).replace("{early}", early.name))
    response = send(client, "put", "/api/steering", body)
    assert response.status_code == status, response.content
    assert response.json()["error"]["code"] == code
    assert client.get("/api/steering").json()["data"] == before
    inline = send(client, "post", "/v1/chat/completions", {**CHAT, "model": model.name, "steering": body})
    assert inline.status_code == 400, inline.content
    assert inline.json()["error"]["code"] == code.lower()


def test_a_profile_holds_features_of_both_saes_and_round_trips_through_the_mistudio_file(client, serving):
    model, late, early = serving
    features = [{"index": CAT, "strength": 40.0},
                {"sae": early.name, "index": 42, "strength": 20.0,
                 "when": {"sae": late.name, "index": CAT, "below": 1e6}}]  # a lagged condition that always holds
    body = {"name": "two-saes", "model": model.name, "sae": late.name, "features": features}
    response = send(client, "post", "/api/profiles", body)
    assert response.status_code in (200, 201), response.content
    exported = client.get("/api/profiles/two-saes/export").json()
    exported = exported.get("data", exported)
    assert [(f.get("sae"), f["index"]) for f in exported["features"]] == [(None, CAT), (early.name, 42)]
    assert exported["features"][1]["when"] == {"sae": late.name, "index": CAT, "below": 1e6}
    # Today's single-SAE file (no `sae` per feature) and this one import alike.
    imported = send(client, "post", "/api/profiles/import", {**exported, "name": "two-saes-copy"})
    assert imported.status_code in (200, 201), imported.content
    steered = chat(client, model.name, steering={"features": features})
    assert client.post("/api/profiles/two-saes-copy/activate").status_code == 200
    assert chat(client, model.name) == steered
    bad = send(client, "post", "/api/profiles", {**body, "name": "bad",
                                                  "features": [{"sae": early.name, "index": 256, "strength": 1.0}]})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "INVALID_FEATURE_INDEX"


def test_every_attached_sae_is_desired_in_attach_order_and_detaching_one_keeps_the_others_order(tiny_catalog):
    model, late = tiny_catalog
    early = SparseAutoencoder.objects.get(model=model, layer=1)
    for sae in (early, late, early):  # re-attaching keeps its place
        sae_set_status(name=sae.name, status=SaeStatus.ATTACHED, attached=True)
    desired = SparseAutoencoder.objects.filter(desired_attached=True).order_by("attached_order")
    assert [s.name for s in desired] == [early.name, late.name]
    sae_set_status(name=early.name, status=SaeStatus.READY, attached=False)
    assert [s.name for s in SparseAutoencoder.objects.filter(desired_attached=True)] == [late.name]
    sae_set_status(name=early.name, status=SaeStatus.ATTACHED, attached=True)  # back, after the other
    desired = SparseAutoencoder.objects.filter(desired_attached=True).order_by("attached_order")
    assert [s.name for s in desired] == [late.name, early.name]


OWN = {"tiny-llama-layer_2": 3.0, "tiny-llama-layer_1": 11.0}  # raw calibrated strengths, one per SAE


@pytest.fixture
def calibrated(client, tiny_catalog, inference_worker, tmp_path):
    """Both SAEs with their own calibration.json (every feature at the SAE's OWN strength), both attached."""
    model, late = tiny_catalog
    early = SparseAutoencoder.objects.get(model=model, layer=1)
    for sae in (late, early):
        folder = tmp_path / sae.name
        shutil.copytree(sae.local_path, folder)
        strength = OWN[sae.name]
        write_calibration(folder, recipe=CalibrationRecipe(), residual_norm=sae.residual_norm or 1.0,
                          strengths={"recommended": [strength] * sae.d_sae, "low": [strength / 2] * sae.d_sae,
                                     "high": [strength * 2] * sae.d_sae, "source": ["kl"] * sae.d_sae},
                          method={"name": "test"})
        SparseAutoencoder.objects.filter(pk=sae.pk).update(local_path=str(folder))
    assert client.post(f"/api/models/{model.name}/load").status_code == 200
    for sae in (late, early):
        assert client.post(f"/api/saes/{sae.name}/attach").status_code == 200
    return model, late, early


def test_a_feature_without_a_strength_gets_its_own_saes_calibrated_strength(client, calibrated):
    model, late, early = calibrated
    body = {"features": [{"index": CAT}, {"sae": early.name, "index": 42}]}
    response = send(client, "put", "/api/steering", body)
    assert response.status_code == 200, response.content
    assert response.json()["data"]["features"] == [{"index": CAT, "strength": OWN[late.name]},
                                                   {"index": 42, "strength": OWN[early.name], "sae": early.name}]
    compare = send(client, "post", "/api/steering/compare", {"prompt": "Hello!", "max_tokens": 6, **body})
    assert compare.status_code == 200, compare.content
    bad = send(client, "put", "/api/steering", {"features": [{"sae": "gone", "index": 42}]})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "SAE_NOT_ATTACHED"


def test_a_sweep_steers_and_scores_a_feature_of_another_sae_around_its_own_strength(client, calibrated):
    model, late, early = calibrated
    body = {"features": [{"sae": early.name, "index": 42}], "strengths": "auto", "prompts": ["Hello!"],
            "max_tokens": 6}
    response = send(client, "post", "/api/steering/sweep", body)
    assert response.status_code == 200, response.content
    result = response.json()["data"]["result"]
    own = OWN[early.name]
    assert result["strengths"] == [0.0, *(own * f for f in (0.25, 0.5, 1.0, 2.0, 4.0))]
    assert [(f["sae"], f["index"]) for f in result["features"]] == [(early.name, 42)]
    baseline, *steered = result["points"]
    # Its concept is read by its own SAE: steering it raises its activation there.
    assert max(p["concept_score"] for p in steered) > baseline["concept_score"]
    assert steered[-1]["outputs"][0]["text"] != baseline["outputs"][0]["text"]
    # Both SAEs at once: each feature scored by its SAE, in the listed order.
    both = send(client, "post", "/api/steering/sweep", {**body, "strengths": [1.0],
                                                         "features": [{"index": CAT, "strength": 40.0},
                                                                      {"sae": early.name, "index": 42,
                                                                       "strength": 20.0}]})
    assert both.status_code == 200, both.content
    assert [(f["sae"], f["index"]) for f in both.json()["data"]["result"]["features"]] == [
        (late.name, CAT), (early.name, 42)]
    for features, code in (([{"sae": "gone", "index": 42}], "SAE_NOT_ATTACHED"),
                           ([{"sae": early.name, "index": 256}], "INVALID_FEATURE_INDEX")):
        refused = send(client, "post", "/api/steering/sweep", {**body, "features": features})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == code, refused.content


def test_the_compare_diff_names_the_sae_of_its_top_changed_features(client, calibrated):
    model, late, early = calibrated
    response = send(client, "post", "/api/steering/compare", {
        "prompt": "Hello!", "max_tokens": 8, "features": [{"index": CAT, "strength": 40.0},
                                                          {"sae": early.name, "index": 42, "strength": 20.0}]})
    assert response.status_code == 200, response.content
    changed = response.json()["data"]["token_diff"]["top_changed_features"]
    assert changed and {f["sae"] for f in changed} <= {late.name, early.name}  # every attached SAE reads them
