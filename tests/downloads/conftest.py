"""A stand-in hub serving the test tier (and a few variants), and settings that point downloads at it."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import ASSET_CACHE
from tests.downloads.hub_server import StandInHub

# Set by some CI setups; huggingface_hub reads it once at import and would then refuse every download.
os.environ.pop("HF_HUB_OFFLINE", None)

MODEL_REPO = "millm/tiny-llama"
SAE_REPO = "millm/tiny-llama-sae"
SAE_PATH = "layer_2"
WIDE_REPO = "millm/tiny-llama-wide"  # > 10 MiB of weights: huggingface_hub resumes in 10 MiB steps
CUSTOM_CODE_REPO = "millm/needs-custom-code"
# A real SAELens release in sae-lens' own format; the stand-in serves the tiny SAE under its repo/path.
RELEASE, RELEASE_SAE_ID = "gpt2-small-res-jb", "blocks.2.hook_resid_pre"
RELEASE_REPO, RELEASE_PATH = "jbloom/GPT2-Small-SAEs-Reformatted", "blocks.2.hook_resid_pre"


def _wide_model(folder: Path, tiny: Path) -> Path:
    """A random Llama the size of a small real checkpoint (~27 MB), with the test tier's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((tiny / "config.json").read_text())
    config.update(hidden_size=384, intermediate_size=1024, num_attention_heads=6, num_key_value_heads=2, head_dim=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"}))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny / name).exists():
            shutil.copy(tiny / name, folder / name)
    return folder


def _custom_code_model(folder: Path, tiny: Path) -> Path:
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_custom.py").write_text("raise SystemExit('repo code must never run here')\n")
    return folder


@pytest.fixture(scope="session")
def hub_sources(test_tier_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-sources")
    tiny = test_tier_assets.model.local_path
    return {
        MODEL_REPO: tiny,
        SAE_REPO: test_tier_assets.sae.local_path,
        WIDE_REPO: _wide_model(root / "wide", tiny),
        CUSTOM_CODE_REPO: _custom_code_model(root / "custom", tiny),
    }


@pytest.fixture(scope="session")
def hub_server(hub_sources):
    hub = StandInHub().start()
    hub.add_repo(MODEL_REPO, hub_sources[MODEL_REPO], tags=("v1.0",))
    hub.add_repo(SAE_REPO, hub_sources[SAE_REPO], prefix=SAE_PATH)
    hub.add_repo(WIDE_REPO, hub_sources[WIDE_REPO])
    hub.add_repo(CUSTOM_CODE_REPO, hub_sources[CUSTOM_CODE_REPO])
    hub.add_repo(RELEASE_REPO, hub_sources[SAE_REPO], prefix=RELEASE_PATH)
    yield hub
    hub.stop()


@pytest.fixture
def hub(hub_server):
    """The session's hub with a clean request log and no injected faults."""
    hub_server.reset()
    return hub_server


@pytest.fixture
def dl_settings(settings, hub, tmp_path):
    """Downloads go to the stand-in hub and into this test's own cache folders."""
    settings.HF_ENDPOINT = hub.url
    settings.MODEL_CACHE_DIR = tmp_path / "models"
    settings.SAE_CACHE_DIR = tmp_path / "saes"
    settings.DEMO_ASSETS_DIR = ASSET_CACHE
    settings.DOWNLOAD_MIN_FREE_BYTES = 0
    return settings


def assert_same_files(source: Path, copy: Path) -> None:
    """Every file of `source` is in `copy` with identical bytes (huggingface_hub's .cache/ aside)."""
    names = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    copied = sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*")
                    if p.is_file() and ".cache" not in p.relative_to(copy).parts)
    assert copied == names
    _, mismatch, errors = filecmp.cmpfiles(source, copy, names, shallow=False)
    assert mismatch == [] and errors == []
