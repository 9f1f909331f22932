"""The Models and SAEs pages' download forms, cancel, and the model/SAE cards (in-process, eager Celery)."""

from __future__ import annotations

import json
import socket

import pytest

from catalog.models import LanguageModel
from downloads.models import Download
from steering.models import SparseAutoencoder
from tests.downloads.conftest import MODEL_REPO, RELEASE, RELEASE_SAE_ID, SAE_PATH, SAE_REPO

pytestmark = pytest.mark.django_db
HX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def eager_celery():
    from millm_site.celery import app

    app.conf.task_always_eager = True
    yield app
    app.conf.task_always_eager = False


def post_form(client, capture, path, data):
    with capture(execute=True):  # the commit hook sends the task; eager Celery runs it here
        return client.post(path, data, **HX)


def test_model_then_sae_download_through_the_forms(client, dl_settings, eager_celery,
                                                    django_capture_on_commit_callbacks):
    page = client.get("/models/").content.decode()
    assert 'id="model-download-form"' in page and 'ws-connect="/ws/progress/"' in page and 'id="live-rows"' in page
    row = post_form(client, django_capture_on_commit_callbacks, "/models/download",
                    {"repo_id": MODEL_REPO, "revision": "main", "quantization": "q8", "name": "hub-tiny"})
    assert row.status_code == 200 and 'data-into="downloads-model"' in row.content.decode()
    download = Download.objects.get(name="hub-tiny")
    assert download.status == "completed" and download.quantization == "q8"
    page = client.get("/models/").content.decode()
    assert f'id="download-{download.pk}"' in page and "badge-completed" in page
    assert "236K" in page  # the test tier's 235,584 parameters, in human units

    saes = client.get("/saes/").content.decode()
    assert 'id="sae-download-form"' in saes and "<option>hub-tiny</option>" in saes
    row = post_form(client, django_capture_on_commit_callbacks, "/saes/download",
                    {"model": "hub-tiny", "source": "repo", "repo_id": SAE_REPO, "path": SAE_PATH})
    assert 'data-into="downloads-sae"' in row.content.decode()
    sae = SparseAutoencoder.objects.get(name="hub-tiny-layer_2")
    saes = client.get("/saes/").content.decode()
    assert 'id="sae-hub-tiny-layer_2"' in saes and f"/saes/{sae.name}/features/0/" in saes


def test_a_saelens_release_resolves_through_the_form(client, dl_settings, eager_celery, tiny_catalog,
                                                     django_capture_on_commit_callbacks):
    model, _ = tiny_catalog
    post_form(client, django_capture_on_commit_callbacks, "/saes/download",
              {"model": model.name, "source": "release", "release": RELEASE, "sae_id": RELEASE_SAE_ID, "name": "rel"})
    assert Download.objects.get(name="rel").status == "completed"
    assert SparseAutoencoder.objects.filter(name="rel").exists()


def test_bad_forms_are_refused_in_the_error_box_and_change_nothing(client, dl_settings, tiny_catalog):
    model, _ = tiny_catalog
    for path, data in [("/models/download", {"repo_id": "not a repo id!"}),
                       ("/models/download", {"repo_id": MODEL_REPO, "quantization": "q3"}),
                       ("/models/download", {"repo_id": MODEL_REPO, "name": model.name}),
                       ("/saes/download", {"model": model.name, "source": "release", "release": RELEASE}),
                       ("/saes/download", {"model": "no-such-model", "source": "repo", "repo_id": SAE_REPO}),
                       ("/saes/download", {"model": model.name, "source": "repo", "repo_id": SAE_REPO,
                                           "path": "../etc"})]:
        response = client.post(path, data, **HX)
        assert response.status_code == 200 and response["HX-Retarget"] == "#action-error", (path, data)
        assert "Traceback" not in response.content.decode()
    assert not Download.objects.exists() and LanguageModel.objects.count() == 1
    assert client.get("/models/download").status_code == 405


def test_offline_the_row_says_the_hub_is_unreachable(client, dl_settings, eager_celery,
                                                     django_capture_on_commit_callbacks):
    with socket.socket() as s:  # a port nobody listens on: the hub is unreachable
        s.bind(("127.0.0.1", 0))
        dl_settings.HF_ENDPOINT = f"http://127.0.0.1:{s.getsockname()[1]}"
    row = post_form(client, django_capture_on_commit_callbacks, "/models/download", {"repo_id": MODEL_REPO})
    assert row.status_code == 200
    download = Download.objects.get()
    assert download.status == "failed" and download.error_code == "DOWNLOAD_FAILED"
    page = client.get("/models/").content.decode()
    assert "Cannot reach the hub" in page and 'class="download-error"' in page
    assert not LanguageModel.objects.filter(name=download.name).exists()


def test_cancel_from_the_page(client, dl_settings, tiny_catalog, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False):  # queued, not sent: cancel acts at once
        row = client.post("/models/download", {"repo_id": MODEL_REPO, "name": "to-cancel"}, **HX).content.decode()
    download = Download.objects.get(name="to-cancel")
    assert 'class="download-cancel"' in row and download.status == "queued"
    cancelled = client.post(f"/models/downloads/{download.pk}/cancel", **HX).content.decode()
    assert "badge-cancelled" in cancelled and 'class="download-cancel"' not in cancelled
    again = client.post(f"/models/downloads/{download.pk}/cancel", **HX)
    assert again["HX-Retarget"] == "#action-error" and "already cancelled" in again.content.decode()
    missing = client.post("/models/downloads/999999/cancel", **HX)
    assert missing["HX-Retarget"] == "#action-error"


def test_sae_cards_show_quality_from_the_folder(client, tiny_catalog, tmp_path):
    _, sae = tiny_catalog
    folder = tmp_path / "sae"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"l0_held_out": 31.25, "fvu_held_out": 0.125,
                                                     "dead_fraction": 0.03}))
    SparseAutoencoder.objects.filter(pk=sae.pk).update(local_path=str(folder))
    html = client.get("/saes/").content.decode()
    assert '<td class="num sae-l0" title="mean active features per token">31.3</td>' in html
    assert "0.125 / 87.5%" in html and "3.0%" in html
