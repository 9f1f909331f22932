"""The demo build without its calibrations (issue 11: the first `make run` serves before they finish): on a copy
of the cached demo tier (the model linked, the SAE folders copied without calibration.json; the cache itself is
never changed), `build_demo_tier(calibrate=False)` writes no calibration.json and reports both SAEs pending,
`calibrate_demo_tier` computes nothing while another process holds the build lock, and the synchronous default
still computes a missing calibration (the second SAE's KL pass, ≈ 84 CPU s)."""

from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import ASSET_CACHE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
CACHED = ASSET_CACHE / "demo"
SAE_DIRS = ("sae", "sae_layer_6")


@pytest.fixture
def uncalibrated(tmp_path) -> Path:
    from engine.assets.smollm2 import read_manifest

    if read_manifest(CACHED) is None or not all((CACHED / d / "calibration.json").is_file() for d in SAE_DIRS):
        pytest.skip("needs the built demo tier in the asset cache (make demo); this test never builds it")
    copy = tmp_path / "demo"
    copy.mkdir()
    (copy / "model").symlink_to(CACHED / "model")  # only read
    shutil.copy2(CACHED / "manifest.json", copy / "manifest.json")
    for name in SAE_DIRS:
        shutil.copytree(CACHED / name, copy / name, ignore=shutil.ignore_patterns("calibration.json"))
    return copy


def test_the_build_without_calibration_writes_none_and_leaves_both_pending(uncalibrated):
    from engine.assets.smollm2 import build_demo_tier, demo_calibration_pending

    assets = build_demo_tier(uncalibrated, progress=False, calibrate=False)
    assert [s.sae_id for s in (assets.sae, *assets.extra_saes)] == ["layer_15", "layer_6"]
    for name in SAE_DIRS:
        assert not (uncalibrated / name / "calibration.json").exists()
        assert (uncalibrated / name / "steering.json").is_file()  # steering with explicit strengths works
    assert demo_calibration_pending(uncalibrated) == [uncalibrated / name for name in SAE_DIRS]
    assert demo_calibration_pending(CACHED) == []


def test_the_background_calibration_yields_to_a_holder_of_the_build_lock(uncalibrated):
    from engine.assets.smollm2 import calibrate_demo_tier

    with open(uncalibrated / ".build.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert calibrate_demo_tier(uncalibrated) is False
    assert not (uncalibrated / "sae" / "calibration.json").exists()


def test_the_background_calibration_refuses_a_folder_without_a_build(tmp_path):
    from engine.assets.smollm2 import DemoAssetsError, calibrate_demo_tier

    with pytest.raises(DemoAssetsError, match="build it first"):
        calibrate_demo_tier(tmp_path / "empty")


def test_the_default_build_still_computes_a_missing_calibration(uncalibrated):
    from engine.assets.smollm2 import CALIBRATION_RECIPE_VERSION, build_demo_tier, demo_calibration_pending

    shutil.copy2(CACHED / "sae" / "calibration.json", uncalibrated / "sae" / "calibration.json")  # the long one
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_demo_tier(uncalibrated, progress=False)
    finally:
        torch.set_num_threads(threads)
    written = json.loads((uncalibrated / "sae_layer_6" / "calibration.json").read_text())
    assert written["method"]["demo_recipe"] == CALIBRATION_RECIPE_VERSION
    assert len(written["recommended"]) == 2048
    assert demo_calibration_pending(uncalibrated) == []
