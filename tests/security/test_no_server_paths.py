"""Error bodies name settings, never the server's absolute paths."""

import json
from pathlib import Path

import pytest
from django.conf import settings as django_settings

pytestmark = pytest.mark.django_db


def server_paths() -> list[str]:
    roots = [django_settings.MODEL_CACHE_DIR, django_settings.SAE_CACHE_DIR, django_settings.DEMO_ASSETS_DIR,
             django_settings.VAR_DIR, django_settings.BASE_DIR]
    return [str(Path(p).resolve()) for p in roots]


def post(client, path, payload):
    return client.post(path, json.dumps(payload), content_type="application/json")


@pytest.fixture
def empty_model_folder(settings, tmp_path):
    settings.MODEL_CACHE_DIR = tmp_path / "models"
    settings.SAE_CACHE_DIR = tmp_path / "saes"
    folder = settings.MODEL_CACHE_DIR / "org--empty" / "main"
    folder.mkdir(parents=True)
    (settings.SAE_CACHE_DIR / "bad-sae").mkdir(parents=True)
    (settings.SAE_CACHE_DIR / "bad-sae" / "cfg.json").write_text("{}")
    return folder


@pytest.mark.parametrize("path,payload", [
    ("/api/models/register-local", {"path": "/etc", "name": "etc"}),
    ("/api/models/register-local", {"path": "org--empty/main", "name": "empty"}),
    ("/api/models/register-local", {"path": "does-not-exist", "name": "gone"}),
    ("/api/saes/register-local", {"path": "bad-sae", "model": "nope"}),
])
def test_register_local_errors_name_settings_not_paths(client, empty_model_folder, tiny_catalog, path, payload):
    if payload.get("model") == "nope":
        payload = {**payload, "model": tiny_catalog[0].name}
    response = post(client, path, payload)
    assert 400 <= response.status_code < 500, response.content
    body = response.content.decode()
    for server_path in [*server_paths(), str(empty_model_folder.parent.parent)]:
        assert server_path not in body, (server_path, body)
    error = response.json()["error"]
    assert error["message"]


def test_outside_the_roots_lists_the_settings(client, empty_model_folder):
    error = post(client, "/api/models/register-local", {"path": "/etc", "name": "etc"}).json()["error"]
    assert error["details"]["allowed_roots"] == ["MODEL_CACHE_DIR", "SAE_CACHE_DIR", "MILLM_ASSET_CACHE"]
