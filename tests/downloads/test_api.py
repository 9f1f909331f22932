"""The download and catalog-file endpoints of /api, with the Celery task run eagerly in this process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from catalog.models import LanguageModel
from downloads.models import Download
from steering.models import SparseAutoencoder
from tests.downloads.conftest import MODEL_REPO, SAE_PATH, SAE_REPO

pytestmark = pytest.mark.django_db


@pytest.fixture
def eager_celery():
    from millm_site.celery import app

    app.conf.task_always_eager = True
    yield app
    app.conf.task_always_eager = False


def post(client, path, body):
    return client.post(path, json.dumps(body), content_type="application/json")


def queue_and_run(client, django_capture_on_commit_callbacks, path, body):
    """POST a download; the commit hook sends the task, which eager Celery runs right here."""
    with django_capture_on_commit_callbacks(execute=True):
        response = post(client, path, body)
    assert response.status_code == 202, response.content
    queued = response.json()["data"]
    assert queued["status"] == "queued"
    return client.get(f"/api/downloads/{queued['id']}").json()["data"]


def test_download_model_and_sae_then_delete_them(client, dl_settings, hub, eager_celery,
                                                 django_capture_on_commit_callbacks):
    model = queue_and_run(client, django_capture_on_commit_callbacks, "/api/models/download",
                          {"repo_id": MODEL_REPO, "name": "hub-tiny", "quantization": "q4"})
    assert (model["status"], model["model"], model["percent"], model["error"]) == ("completed", "hub-tiny", 100.0, None)
    entry = client.get("/api/models/hub-tiny").json()["data"]
    assert (entry["status"], entry["quantization"], entry["hidden_size"]) == ("ready", "q4", 64)

    sae = queue_and_run(client, django_capture_on_commit_callbacks, "/api/saes/download",
                        {"model": "hub-tiny", "repo_id": SAE_REPO, "path": SAE_PATH})
    assert (sae["status"], sae["sae"]) == ("completed", "hub-tiny-layer_2")
    assert client.get("/api/saes/hub-tiny-layer_2").json()["data"]["d_sae"] == 256

    listed = client.get("/api/downloads", {"kind": "model"}).json()["data"]
    assert [d["id"] for d in listed] == [model["id"]]

    sae_dir = Path(SparseAutoencoder.objects.get(name="hub-tiny-layer_2").local_path)
    gone = client.delete("/api/saes/hub-tiny-layer_2").json()
    assert gone["data"]["removed_folders"] == [str(sae_dir)] and not sae_dir.exists()
    assert not sae_dir.parent.exists()  # the repo folder held nothing else (huggingface_hub's .cache aside)

    model_dir = Path(entry["local_path"])
    deleted = client.delete("/api/models/hub-tiny").json()["data"]
    assert deleted["removed_folders"] == [str(model_dir)] and not model_dir.exists()
    assert client.get("/api/models/hub-tiny").status_code == 404
    assert client.get("/api/models").json()["success"]  # GET on the shared paths still answers
    assert Download.objects.get(pk=model["id"]).catalog_model is None  # the history stays


def test_a_failed_download_is_reported_on_its_row(client, dl_settings, hub, eager_celery,
                                                  django_capture_on_commit_callbacks):
    failed = queue_and_run(client, django_capture_on_commit_callbacks, "/api/models/download",
                           {"repo_id": "millm/does-not-exist"})
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "DOWNLOAD_FAILED" and failed["error"]["details"]["reason"] == "repo_not_found"
    assert "millm/does-not-exist" in failed["error"]["message"]
    assert not LanguageModel.objects.filter(name="does-not-exist").exists()


def test_cancel_a_queued_download(client, dl_settings, hub):
    # No worker runs here and no commit hook fires: the download stays queued until cancelled.
    queued = post(client, "/api/models/download", {"repo_id": MODEL_REPO}).json()["data"]
    assert LanguageModel.objects.get(name="tiny-llama").status == "downloading"
    refused = client.delete("/api/models/tiny-llama")
    assert refused.status_code == 409 and "cancel its download" in refused.json()["error"]["message"]

    cancelled = client.post(f"/api/downloads/{queued['id']}/cancel").json()["data"]

    assert (cancelled["status"], cancelled["cancel_requested"], cancelled["model"]) == ("cancelled", True, None)
    assert not LanguageModel.objects.filter(name="tiny-llama").exists()
    again = client.post(f"/api/downloads/{queued['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "CONFLICT"

    from downloads.services import download_run

    assert download_run(download_id=queued["id"]).status == "cancelled"  # a late worker does nothing
    assert hub.requests == []


def test_register_local_model_and_sae(client, dl_settings, test_tier_assets):
    model = post(client, "/api/models/register-local",
                 {"path": str(test_tier_assets.model.local_path), "name": "local-tiny"}).json()
    assert model["success"], model
    assert (model["data"]["hidden_size"], model["data"]["num_layers"]) == (64, 4)
    assert model["data"]["parameter_count"] == test_tier_assets.model.parameter_count

    sae = post(client, "/api/saes/register-local",
               {"path": str(test_tier_assets.sae.local_path), "model": "local-tiny"}).json()
    assert sae["success"], sae
    assert (sae["data"]["name"], sae["data"]["layer"], sae["data"]["d_in"]) == ("local-tiny-sae", 2, 64)

    # Files outside the download folders (here: the asset cache) stay when the entry goes.
    deleted = client.delete("/api/models/local-tiny").json()["data"]
    assert deleted == {"name": "local-tiny", "deleted_saes": ["local-tiny-sae"], "removed_folders": []}
    assert (test_tier_assets.model.local_path / "config.json").is_file()


def test_unknown_download_and_bad_filter(client):
    assert client.get("/api/downloads/999").json()["error"]["code"] == "NOT_FOUND"
    bad = client.get("/api/downloads", {"status": "sleeping"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "VALIDATION_ERROR"


def test_loaded_model_and_attached_sae_are_not_deleted(client, tiny_catalog):
    model, sae = tiny_catalog
    LanguageModel.objects.filter(pk=model.pk).update(status="loaded", desired_loaded=True)
    SparseAutoencoder.objects.filter(pk=sae.pk).update(status="attached", desired_attached=True)

    for path, says in ((f"/api/saes/{sae.name}", "detach it first"), (f"/api/models/{model.name}", "unload it first")):
        refused = client.delete(path)
        assert refused.status_code == 409 and says in refused.json()["error"]["message"]
    assert LanguageModel.objects.filter(pk=model.pk).exists() and SparseAutoencoder.objects.filter(pk=sae.pk).exists()
