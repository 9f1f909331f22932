"""Bad requests: each gets a clear code and message, and none leaves a catalog entry behind."""

from __future__ import annotations

import json
import os

import pytest

from catalog.models import LanguageModel
from downloads.models import Download
from downloads.services import download_run, model_download_request
from steering.models import SparseAutoencoder
from tests.downloads.conftest import CUSTOM_CODE_REPO, MODEL_REPO, SAE_REPO

pytestmark = pytest.mark.django_db


def post(client, path, body):
    return client.post(path, json.dumps(body), content_type="application/json")


@pytest.fixture
def no_entries_left():
    before = (LanguageModel.objects.count(), SparseAutoencoder.objects.count())
    yield
    assert (LanguageModel.objects.count(), SparseAutoencoder.objects.count()) == before


@pytest.mark.parametrize(("path", "body", "status", "code", "says"), [
    ("/api/models/download", {"repo_id": "not a repo!!"}, 422, "VALIDATION_ERROR", "not a hub repo id"),
    ("/api/models/download", {"repo_id": "a/b/c"}, 422, "VALIDATION_ERROR", "not a hub repo id"),
    ("/api/models/download", {"repo_id": "org/model", "revision": "../../etc"}, 422, "VALIDATION_ERROR", "revision"),
    ("/api/models/download", {"repo_id": "org/model", "quantization": "q3"}, 422, "VALIDATION_ERROR", "quantization"),
    ("/api/models/download", {"repo_id": "org/model", "name": "Bad Name"}, 422, "VALIDATION_ERROR", "slug"),
    ("/api/models/download", {"revision": "main"}, 422, "VALIDATION_ERROR", "repo_id"),
    ("/api/saes/download", {"model": "tiny-llama", "repo_id": SAE_REPO, "path": "../../etc"}, 422,
     "VALIDATION_ERROR", "not a folder inside the repo"),
    ("/api/saes/download", {"model": "tiny-llama", "repo_id": SAE_REPO, "release": "r", "sae_id": "s"}, 422,
     "VALIDATION_ERROR", "not both"),
    ("/api/saes/download", {"model": "tiny-llama", "release": "r"}, 422, "VALIDATION_ERROR", "needs both"),
    ("/api/saes/download", {"model": "no-such-model", "repo_id": SAE_REPO}, 404, "MODEL_NOT_FOUND", "no-such-model"),
    ("/api/models/download", {"repo_id": MODEL_REPO, "name": "tiny-llama"}, 409, "CONFLICT", "already in the catalog"),
    ("/api/models/register-local", {"path": "../../../etc", "name": "x"}, 422, "VALIDATION_ERROR", "traversal"),
    ("/api/models/register-local", {"path": "/etc", "name": "x"}, 422, "VALIDATION_ERROR", "outside the allowed"),
    ("/api/saes/register-local", {"path": "/tmp/../etc", "model": "tiny-llama"}, 422, "VALIDATION_ERROR", "traversal"),
    ("/api/models/register-local", {"path": "nowhere", "name": "x"}, 422, "VALIDATION_ERROR", "not a folder"),
])
def test_refused_at_once(client, dl_settings, tiny_catalog, no_entries_left, path, body, status, code, says):
    downloads_before = Download.objects.count()

    response = post(client, path, body)

    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert error["code"] == code and says in error["message"], error
    assert Download.objects.count() == downloads_before


def test_a_symlink_out_of_the_cache_is_refused(client, dl_settings, tmp_path, no_entries_left):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    dl_settings.MODEL_CACHE_DIR.mkdir(parents=True)
    os.symlink(outside, dl_settings.MODEL_CACHE_DIR / "sneaky")

    error = post(client, "/api/models/register-local", {"path": "sneaky", "name": "sneaky"}).json()["error"]

    assert error["code"] == "VALIDATION_ERROR" and "outside the allowed" in error["message"]


@pytest.mark.parametrize(("repo_id", "revision", "reason", "says"), [
    ("millm/does-not-exist", "main", "repo_not_found", "was not found"),
    (MODEL_REPO, "v9.9", "revision_not_found", "Revision 'v9.9' was not found"),
])
def test_hub_refusals_fail_the_download(dl_settings, hub, no_entries_left, repo_id, revision, reason, says):
    done = download_run(download_id=model_download_request(repo_id=repo_id, revision=revision, enqueue=False).pk)

    assert (done.status, done.error_code, done.error_details["reason"]) == ("failed", "DOWNLOAD_FAILED", reason)
    assert says in done.error_message
    assert done.catalog_model is None and done.finished_at is not None


def test_no_disk_space_fails_before_the_first_byte(dl_settings, hub, no_entries_left):
    dl_settings.DOWNLOAD_MIN_FREE_BYTES = 10**18  # more than any disk: the check must refuse

    done = download_run(download_id=model_download_request(repo_id=MODEL_REPO, enqueue=False).pk)

    assert (done.status, done.error_code, done.error_details["reason"]) == (
        "failed", "DOWNLOAD_FAILED", "insufficient_disk_space")
    assert done.error_details["needed_bytes"] == sum(len(f.data) for f in hub.repos[MODEL_REPO].files.values())
    assert "Not enough disk space" in done.error_message
    assert hub.requests == []  # the listing was read, no file was asked for


def test_a_model_that_needs_its_own_code_is_refused_before_its_weights(dl_settings, hub, no_entries_left):
    done = download_run(download_id=model_download_request(repo_id=CUSTOM_CODE_REPO, enqueue=False).pk)

    assert (done.status, done.error_code) == ("failed", "VALIDATION_ERROR")
    assert "trust_remote_code" in done.error_message
    assert [r.path for r in hub.requests if r.method == "GET"] == ["config.json"]  # no weights, no .py


def test_trusted_remote_code_downloads_the_code_too(dl_settings, hub):
    request = model_download_request(repo_id=CUSTOM_CODE_REPO, trust_remote_code=True, enqueue=False)

    done = download_run(download_id=request.pk)

    assert done.status == "completed", done.error_message
    assert {"modeling_custom.py", "model.safetensors"} <= {r.path for r in hub.requests if r.method == "GET"}
