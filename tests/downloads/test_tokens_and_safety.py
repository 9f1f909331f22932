"""Hub tokens (used, never kept), a hub listing that tries to escape the folder, a worker that died."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from catalog.models import LanguageModel
from downloads.models import Download, DownloadStatus
from downloads.selectors import download_as_dict
from downloads.services import download_cancel, download_run, model_download_request
from tests.downloads.conftest import MODEL_REPO

pytestmark = pytest.mark.django_db

TOKEN = "hf_PerDownloadSecret0123456789"


def test_a_token_given_for_one_download_is_sent_and_kept_nowhere(dl_settings, hub, caplog, capfd, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    caplog.set_level(logging.DEBUG)

    done = download_run(download_id=model_download_request(repo_id=MODEL_REPO, enqueue=False).pk, token=TOKEN)

    assert done.status == DownloadStatus.COMPLETED
    assert hub.requests and {r.authorization for r in hub.requests} == {f"Bearer {TOKEN}"}
    stored = json.dumps([download_as_dict(done), list(Download.objects.values()), list(LanguageModel.objects.values())],
                        default=str)
    assert TOKEN not in stored
    assert TOKEN not in caplog.text and TOKEN not in "".join(capfd.readouterr())
    assert not any(TOKEN in p.read_text(errors="ignore") for p in Path(done.local_dir).rglob("*") if p.is_file())


def test_without_a_token_hf_token_from_the_environment_is_used(dl_settings, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fromTheEnvironment")

    done = download_run(download_id=model_download_request(repo_id=MODEL_REPO, enqueue=False).pk)

    assert done.status == DownloadStatus.COMPLETED
    assert {r.authorization for r in hub.requests} == {"Bearer hf_fromTheEnvironment"}


def test_a_listed_name_that_climbs_out_of_the_folder_is_refused(dl_settings, hub, hub_sources, tmp_path):
    hub.add_repo("millm/evil", hub_sources[MODEL_REPO])
    hub.add_file("millm/evil", "../../escaped.txt", b"owned")

    done = download_run(download_id=model_download_request(repo_id="millm/evil", enqueue=False).pk)

    assert (done.status, done.error_details["reason"]) == ("failed", "unsafe_path")
    assert "../../escaped.txt" in done.error_message
    assert hub.requests == [] and not list(tmp_path.rglob("escaped.txt"))
    assert not LanguageModel.objects.filter(name="evil").exists()


def test_cancel_of_a_download_whose_worker_died_finishes_it_at_once(dl_settings):
    download = model_download_request(repo_id=MODEL_REPO, enqueue=False)
    Download.objects.filter(pk=download.pk).update(  # as a worker killed mid-transfer leaves it
        status=DownloadStatus.RUNNING, updated_at=timezone.now() - timedelta(minutes=10))

    cancelled = download_cancel(download_id=download.pk)

    assert cancelled.status == DownloadStatus.CANCELLED
    assert not LanguageModel.objects.filter(name="tiny-llama").exists()


def test_cancel_of_a_live_running_download_only_flags_it(dl_settings):
    download = model_download_request(repo_id=MODEL_REPO, enqueue=False)
    Download.objects.filter(pk=download.pk).update(status=DownloadStatus.RUNNING, updated_at=timezone.now())

    flagged = download_cancel(download_id=download.pk)

    # The worker finishes it at its next progress check; until then the entry is still downloading.
    assert (flagged.status, flagged.cancel_requested) == (DownloadStatus.RUNNING, True)
    assert LanguageModel.objects.get(name="tiny-llama").status == "downloading"
