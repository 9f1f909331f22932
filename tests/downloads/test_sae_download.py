"""SAE downloads: a folder of a hub repo, or a SAELens release resolved through sae-lens' own directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from catalog.models import LanguageModel
from downloads.models import DownloadStatus
from downloads.services import download_run, sae_download_request
from steering.models import SparseAutoencoder
from tests.downloads.conftest import (
    RELEASE,
    RELEASE_PATH,
    RELEASE_REPO,
    RELEASE_SAE_ID,
    SAE_PATH,
    SAE_REPO,
    WIDE_REPO,
    assert_same_files,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def tiny(tiny_catalog):
    return tiny_catalog[0]


def test_sae_from_a_repo_folder_is_registered_and_loads(dl_settings, hub, hub_sources, tiny, test_tier_assets):
    download = sae_download_request(model=tiny.name, repo_id=SAE_REPO, path=f"/{SAE_PATH}/", name="hub-sae",
                                    enqueue=False)
    done = download_run(download_id=download.pk)

    assert done.status == DownloadStatus.COMPLETED, done.error_message
    sae = SparseAutoencoder.objects.get(name="hub-sae")
    built = test_tier_assets.sae
    assert (sae.model, sae.repo_id, sae.sae_id, sae.layer, sae.hook_name) == (
        tiny, SAE_REPO, SAE_PATH, built.layer, built.hook_name)
    assert (sae.d_in, sae.d_sae, sae.architecture, sae.status) == (built.d_in, built.d_sae, built.architecture, "ready")
    assert Path(sae.local_path) == Path(done.local_dir) / SAE_PATH
    assert_same_files(hub_sources[SAE_REPO], Path(sae.local_path))
    assert done.catalog_sae == sae and done.bytes_done == done.bytes_total > 0

    from engine.sae import load_sae

    weights = load_sae(sae.local_path)  # through sae-lens' SAE.load_from_disk
    assert (weights.d_in, weights.d_sae, weights.hook_layer) == (built.d_in, built.d_sae, built.layer)


def test_sae_from_a_saelens_release(dl_settings, hub, hub_sources, tiny):
    download = sae_download_request(model=tiny.name, release=RELEASE, sae_id=RELEASE_SAE_ID, enqueue=False)
    done = download_run(download_id=download.pk)

    assert done.status == DownloadStatus.COMPLETED, done.error_message
    assert (done.repo_id, done.path) == (RELEASE_REPO, RELEASE_PATH)  # as sae-lens' directory maps them
    assert {r.repo_id for r in hub.requests} == {RELEASE_REPO}
    sae = SparseAutoencoder.objects.get(name=done.name)
    assert (sae.repo_id, sae.sae_id) == (RELEASE, RELEASE_SAE_ID)
    assert_same_files(hub_sources[SAE_REPO], Path(sae.local_path))


@pytest.mark.parametrize(("release", "sae_id", "field", "says"), [
    ("no-such-release", "x", "release", "is not a SAELens release"),
    (RELEASE, "blocks.99.hook_resid_pre", "sae_id", "has no SAE"),
    ("gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82", "release", "another format"),
])
def test_bad_release_fails_before_any_transfer(dl_settings, hub, tiny, release, sae_id, field, says):
    done = download_run(download_id=sae_download_request(model=tiny.name, release=release, sae_id=sae_id,
                                                         enqueue=False).pk)

    assert (done.status, done.error_code, done.error_details["field"]) == ("failed", "VALIDATION_ERROR", field)
    assert says in done.error_message
    assert hub.requests == [] and done.catalog_sae is None
    assert SparseAutoencoder.objects.filter(is_demo=False).count() == 0


def test_sae_that_does_not_fit_the_model_is_not_registered(dl_settings, hub, hub_sources):
    wide = download_run(download_id=_wide_request().pk)
    assert wide.status == DownloadStatus.COMPLETED

    done = download_run(download_id=sae_download_request(model=wide.name, repo_id=SAE_REPO, path=SAE_PATH,
                                                         enqueue=False).pk)

    assert (done.status, done.error_code) == ("failed", "VALIDATION_ERROR")
    assert "d_in 64" in done.error_message and "hidden size 384" in done.error_message
    assert not SparseAutoencoder.objects.exists()
    assert LanguageModel.objects.get(name=wide.name).status == "ready"  # the model is untouched


def _wide_request():
    from downloads.services import model_download_request

    return model_download_request(repo_id=WIDE_REPO, enqueue=False)
