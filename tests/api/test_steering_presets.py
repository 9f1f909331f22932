"""Layers, direction and the SAE's recommended preset reach the inference process through /api and /v1
(issue 11): a real inference process (in a thread) serves the test tier; the demo tier (slow) writes the
concept of the feature it is steered toward."""

from __future__ import annotations

import json
import shutil

import pytest

from steering.models import SparseAutoencoder, SteeringState

pytestmark = pytest.mark.django_db(transaction=True)

CAT = 7  # the test tier's ' cat' feature
CHAT = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 12, "temperature": 0}


def post(client, path, body):
    return client.post(path, json.dumps(body), content_type="application/json")


def chat(client, model, steering=None) -> str:
    body = {**CHAT, "model": model, **({"steering": steering} if steering is not None else {})}
    response = post(client, "/v1/chat/completions", body)
    assert response.status_code == 200, response.content
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture
def serving(client, tiny_catalog, inference_worker, tmp_path):
    model, sae = tiny_catalog
    # A copy of the test SAE with a recommendation of its own: decoder rows added at layers 0 and 1 too.
    folder = tmp_path / "sae"
    shutil.copytree(sae.local_path, folder)
    (folder / "steering.json").write_text(json.dumps({
        "mode": "additive", "positions": "all", "units": "residual_norm", "layers": [0, 1], "direction": "decoder",
        "recommended_strength": 1.0, "strength_range": [0.5, 2.0]}))
    SparseAutoencoder.objects.filter(pk=sae.pk).update(local_path=str(folder))
    assert client.post(f"/api/models/{model.name}/load").status_code == 200
    assert client.post(f"/api/saes/{sae.name}/attach").status_code == 200
    return model, sae


def test_the_recommended_preset_is_the_layers_and_direction_it_names(client, serving):
    model, sae = serving
    listed = client.get(f"/api/saes/{sae.name}/features?q=cat").json()["data"]
    assert listed and listed[0]["recommended_strength"] == 1.0 and listed[0]["recommended_units"] == "residual_norm"
    assert client.get(f"/api/saes/{sae.name}").json()["data"]["steering_recommendation"]["layers"] == [0, 1]

    feature = [{"index": CAT, "strength": 0.3}]
    one_layer = chat(client, model.name, {"features": feature, "units": "residual_norm"})
    spread = chat(client, model.name, {"features": feature, "units": "residual_norm", "layers": [0, 1]})
    assert spread != one_layer  # the extra layers were applied
    assert chat(client, model.name, {"features": feature, "preset": "recommended"}) == spread

    applied = client.put("/api/steering", json.dumps({"features": feature, "preset": "recommended"}),
                         content_type="application/json")
    assert applied.status_code == 200, applied.content
    data = applied.json()["data"]
    assert data["layers"] == [0, 1] and data["units"] == "residual_norm" and data["direction"] == "decoder"
    assert chat(client, model.name) == spread  # the active steering, restored from these fields on a restart
    state = SteeringState.current()
    assert state.layers == [0, 1] and state.direction == "decoder"


@pytest.mark.parametrize("body,field", [
    ({"layers": [0, 0]}, "layers"),
    ({"layers": [99]}, "layers"),
    ({"layers": [1], "mode": "clamp"}, "mode"),
    ({"direction": "sideways"}, "direction"),
    ({"preset": "loudest"}, "preset"),
])
def test_bad_options_are_refused_and_change_nothing(client, serving, body, field):
    before = client.get("/api/steering").json()["data"]
    response = client.put("/api/steering", json.dumps({"features": [{"index": CAT, "strength": 1.0}], **body}),
                          content_type="application/json")
    assert response.status_code == 422, response.content
    assert field in json.dumps(response.json()["error"])
    assert client.get("/api/steering").json()["data"] == before


def test_a_preset_the_sae_does_not_have_is_refused_on_v1(client, tiny_catalog, inference_worker):
    model, sae = tiny_catalog
    assert client.post(f"/api/models/{model.name}/load").status_code == 200
    assert client.post(f"/api/saes/{sae.name}/attach").status_code == 200
    response = post(client, "/v1/chat/completions", {**CHAT, "model": model.name,
                                                      "steering": {"features": [], "preset": "recommended"}})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "steering.preset"
