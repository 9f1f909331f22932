"""Profiles over /api: CRUD, activation, miStudio import/export round trip, and refused bad input."""

import json

import pytest

from profiles.models import Profile, ProfileFeature
from tests import factories

pytestmark = pytest.mark.django_db


@pytest.fixture
def catalog():
    model, other = factories.language_model("tiny"), factories.language_model("other")
    sae = factories.sparse_autoencoder(model, "tiny-sae", layer=2)
    return model, other, sae


def post(client, path, body):
    return client.post(path, json.dumps(body), content_type="application/json")


LOUD = {"name": "loud", "description": "cats everywhere", "model": "tiny", "sae": "tiny-sae",
        "features": [{"index": 7, "strength": 40.0, "label": "cat"}, {"index": 12, "strength": -3.5}]}


def test_create_get_and_list(client, catalog):
    created = post(client, "/api/profiles", LOUD).json()
    assert created["success"] and created["data"]["features"][0] == {"index": 7, "strength": 40.0, "label": "cat"}
    assert client.get("/api/profiles/loud").json()["data"]["sae_name"] == "tiny-sae"
    assert [p["name"] for p in client.get("/api/profiles").json()["data"]] == ["loud"]


def test_export_then_import_gives_the_same_profile(client, catalog):
    post(client, "/api/profiles", {**LOUD, "mode": "clamp", "positions": "generated_only"})
    exported = client.get("/api/profiles/loud/export").json()
    assert exported["version"] == "1.0" and exported["sae"]["layer"] == 2
    client.delete("/api/profiles/loud")
    assert not Profile.objects.exists()
    response = post(client, "/api/profiles/import", exported)
    assert response.status_code == 200, response.content
    imported = response.json()["data"]
    again = client.get("/api/profiles/loud/export").json()
    strip = lambda d: {k: v for k, v in d.items() if k not in ("created_at", "updated_at")}  # noqa: E731
    assert strip(again) == strip(exported)
    assert imported["mode"] == "clamp" and imported["positions"] == "generated_only"


def test_activating_a_profile_whose_sae_is_not_attached_changes_nothing(client, catalog):
    post(client, "/api/profiles", LOUD)
    response = client.post("/api/profiles/loud/activate")
    assert response.status_code == 400 and response.json()["error"]["code"] == "SAE_NOT_ATTACHED"
    assert not Profile.objects.filter(is_active=True).exists()


def test_replace_updates_features(client, catalog):
    post(client, "/api/profiles", LOUD)
    response = client.put("/api/profiles/loud", json.dumps({**LOUD, "features": [{"index": 1, "strength": 2}]}),
                          content_type="application/json")
    assert response.status_code == 200
    assert list(ProfileFeature.objects.values_list("index", "strength")) == [(1, 2.0)]


MISTUDIO = {"version": "1.0", "name": "imp", "model": {"repo_id": "org/tiny"},
            "sae": {"repo_id": "org/tiny-sae", "layer": 2}, "features": [{"index": 3, "strength": 5.0}]}

BAD_INPUTS = [
    ("/api/profiles", {**LOUD, "features": [{"index": 64, "strength": 1}]}, 400, "INVALID_FEATURE_INDEX"),
    ("/api/profiles", {**LOUD, "features": [{"index": -1, "strength": 1}]}, 422, "VALIDATION_ERROR"),
    ("/api/profiles", {**LOUD, "features": [{"index": 1, "strength": 1}, {"index": 1, "strength": 2}]}, 422,
     "VALIDATION_ERROR"),
    ("/api/profiles", {**LOUD, "features": [{"index": 1, "strength": 1e9}]}, 422, "VALIDATION_ERROR"),
    ("/api/profiles", {**LOUD, "name": "has space"}, 422, "VALIDATION_ERROR"),
    ("/api/profiles", {**LOUD, "model": "ghost"}, 404, "MODEL_NOT_FOUND"),
    ("/api/profiles", {**LOUD, "sae": "ghost"}, 404, "SAE_NOT_FOUND"),
    ("/api/profiles", {**LOUD, "model": "other"}, 422, "VALIDATION_ERROR"),  # SAE for another model
    ("/api/profiles", {**LOUD, "mode": "multiply"}, 422, "VALIDATION_ERROR"),
    ("/api/profiles/import", {**MISTUDIO, "version": "2.0"}, 422, "VALIDATION_ERROR"),
    ("/api/profiles/import", {**MISTUDIO, "features": [{"index": 3, "strength": "loud"}]}, 422, "VALIDATION_ERROR"),
    ("/api/profiles/import", {**MISTUDIO, "features": [{"index": 99, "strength": 1.0}]}, 400,
     "INVALID_FEATURE_INDEX"),
    ("/api/profiles/import", {**MISTUDIO, "sae": {"repo_id": "org/nope", "layer": 2}}, 422, "VALIDATION_ERROR"),
    ("/api/profiles/import", {**MISTUDIO, "model": {"repo_id": "org/other"}}, 422, "VALIDATION_ERROR"),
    ("/api/profiles/import", {"name": "x"}, 422, "VALIDATION_ERROR"),
]


@pytest.mark.parametrize("path,body,status,code", BAD_INPUTS)
def test_bad_profile_input_is_refused_whole(client, catalog, path, body, status, code):
    response = post(client, path, body)
    assert response.status_code == status, response.content
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]
    assert not Profile.objects.exists() and not ProfileFeature.objects.exists()


def test_import_error_names_the_field(client, catalog):
    response = post(client, "/api/profiles/import", {**MISTUDIO, "features": [{"index": 3, "strength": "loud"}]})
    assert response.json()["error"]["message"].startswith("features.0.strength:")


def test_nan_strength_is_refused(client, catalog):
    response = client.post("/api/profiles/import", '{"version": "1.0", "name": "n", "features": '
                           '[{"index": 1, "strength": NaN}]}', content_type="application/json")
    assert response.status_code in (400, 422) and not Profile.objects.exists()


def test_duplicate_name_is_a_conflict_and_unknown_profile_is_404(client, catalog):
    post(client, "/api/profiles", LOUD)
    assert post(client, "/api/profiles", LOUD).json()["error"]["code"] == "CONFLICT"
    missing = client.get("/api/profiles/ghost")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "PROFILE_NOT_FOUND"


def test_layers_and_direction_survive_export_and_import(client, catalog):
    spread = {**LOUD, "layers": [0, 1, 3], "direction": "concept"}
    assert post(client, "/api/profiles", spread).status_code == 200
    exported = client.get("/api/profiles/loud/export").json()
    assert exported["layers"] == [0, 1, 3] and exported["direction"] == "concept"
    client.delete("/api/profiles/loud")
    imported = post(client, "/api/profiles/import", exported).json()["data"]
    assert imported["layers"] == [0, 1, 3] and imported["direction"] == "concept"
    miStudio = {k: v for k, v in exported.items() if k not in ("layers", "direction")}  # a file without them
    client.delete("/api/profiles/loud")
    plain = post(client, "/api/profiles/import", miStudio).json()["data"]
    assert plain["layers"] == [] and plain["direction"] == "decoder"


@pytest.mark.parametrize("extra,field", [({"layers": [1, 1]}, "layers"), ({"layers": [4]}, "layers"),
                                         ({"layers": [1], "mode": "clamp"}, "mode"), ({"direction": "up"}, "direction")])
def test_bad_layers_or_direction_are_refused_whole(client, catalog, extra, field):
    response = post(client, "/api/profiles", {**LOUD, **extra})
    assert response.status_code == 422 and field in json.dumps(response.json()["error"])
    assert not Profile.objects.exists()
