"""Model downloads through huggingface_hub's real code against the stand-in hub: files, catalog, resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from catalog.models import LanguageModel, ModelStatus
from downloads.models import Download, DownloadStatus
from downloads.services import download_run, model_download_request
from tests.downloads.conftest import MODEL_REPO, WIDE_REPO, assert_same_files

pytestmark = pytest.mark.django_db


def test_model_download_registers_a_loadable_model(dl_settings, hub, hub_sources, test_tier_assets):
    seen_status = []
    download = model_download_request(repo_id=MODEL_REPO, revision="v1.0", quantization="Q8", name="hub-tiny",
                                      enqueue=False)
    assert LanguageModel.objects.get(name="hub-tiny").status == ModelStatus.DOWNLOADING

    def listener(done: int, total: int | None, current: str) -> None:
        seen_status.append((LanguageModel.objects.get(name="hub-tiny").status, done, current))

    done = download_run(download_id=download.pk, listener=listener)

    assert done.status == DownloadStatus.COMPLETED, done.error_message
    assert {status for status, *_ in seen_status} == {ModelStatus.DOWNLOADING}
    assert seen_status[-1][1] == done.bytes_done == done.bytes_total == sum(
        p.stat().st_size for p in Path(hub_sources[MODEL_REPO]).iterdir())
    assert done.commit == hub.repos[MODEL_REPO].commit
    local = Path(done.local_dir)
    assert local.is_relative_to(dl_settings.MODEL_CACHE_DIR)
    assert_same_files(hub_sources[MODEL_REPO], local)

    model = LanguageModel.objects.get(name="hub-tiny")
    built = test_tier_assets.model
    assert (model.status, model.repo_id, model.revision, model.quantization) == ("ready", MODEL_REPO, "v1.0", "q8")
    assert (model.hidden_size, model.num_layers, model.context_length) == (built.hidden_size, built.num_layers,
                                                                           built.context_length)
    assert model.parameter_count == built.parameter_count  # read from the safetensors header, weights untouched
    assert model.memory_estimate_bytes == built.parameter_count  # q8: one byte per parameter
    assert done.catalog_model == model

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(model.local_path)
    assert sum(p.numel() for p in loaded.parameters()) == built.parameter_count


def test_cut_transfer_resumes_with_a_range_request(dl_settings, hub, hub_sources):
    size = (Path(hub_sources[WIDE_REPO]) / "model.safetensors").stat().st_size
    assert size > 20 * 1024 * 1024
    hub.cut_next("model.safetensors", after_bytes=15_000_000)

    done = download_run(download_id=model_download_request(repo_id=WIDE_REPO, enqueue=False).pk)

    assert done.status == DownloadStatus.COMPLETED, done.error_message
    first, second = hub.gets_of("model.safetensors")
    assert (first.range, first.status) == (None, 200)
    # huggingface_hub keeps what arrived in whole 10 MiB chunks and asks only for the rest.
    assert (second.range, second.status) == (f"bytes={10 * 1024 * 1024}-", 206)
    assert_same_files(hub_sources[WIDE_REPO], Path(done.local_dir))
    assert LanguageModel.objects.get(name="tiny-llama-wide").parameter_count > 6_000_000


def test_a_failed_download_leaves_no_entry_and_a_new_one_skips_complete_files(dl_settings, hub, hub_sources):
    hub.fail_next("tokenizer.json", status=500)  # after config, chat template, weights

    failed = download_run(download_id=model_download_request(repo_id=MODEL_REPO, enqueue=False).pk)

    assert failed.status == DownloadStatus.FAILED
    assert (failed.error_code, failed.error_details["reason"]) == ("DOWNLOAD_FAILED", "hub_http_error")
    assert "tokenizer.json" in failed.error_message and failed.catalog_model is None
    assert not LanguageModel.objects.filter(name="tiny-llama").exists()  # the placeholder went with the failure
    assert (Path(failed.local_dir) / "model.safetensors").is_file()  # kept for the next attempt

    again = download_run(download_id=model_download_request(repo_id=MODEL_REPO, enqueue=False).pk)

    assert again.status == DownloadStatus.COMPLETED
    assert len(hub.gets_of("model.safetensors")) == 1  # fetched by the first attempt only
    assert len(hub.gets_of("tokenizer.json")) == 2
    assert_same_files(hub_sources[MODEL_REPO], Path(again.local_dir))
    assert list(Download.objects.values_list("status", flat=True)) == ["completed", "failed"]


def test_cancel_between_files_stops_and_cleans_up(dl_settings, hub):
    from downloads.services import download_cancel

    download = model_download_request(repo_id=MODEL_REPO, enqueue=False)

    def cancel_after_config(done: int, total: int | None, current: str) -> None:
        if current == "config.json" and done:
            download_cancel(download_id=download.pk)  # as another process would: the flag in the row

    done = download_run(download_id=download.pk, listener=cancel_after_config)

    assert done.status == DownloadStatus.CANCELLED and done.cancel_requested and done.error_code == ""
    assert hub.gets_of("model.safetensors") == []
    assert not LanguageModel.objects.filter(name="tiny-llama").exists()
    assert not Path(done.local_dir).exists() and not Path(done.local_dir).parent.exists()
