"""While the demo's calibration runs in the background (issue 11), a feature sent without a strength on an SAE not
yet calibrated is refused with a message that says so, with its progress; which demo SAEs `serve` queues."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest

from catalog.demo import (
    demo_assets_ensure,
    demo_assets_mark_desired,
    demo_calibration_pending,
    demo_calibration_run,
)
from engine.assets.smollm2 import CALIBRATION_RECIPE_VERSION, read_manifest
from steering.calibration_services import (
    calibration_status,
    calibration_status_write,
    feature_recommended_strength,
    sae_calibration,
)
from steering.models import SparseAutoencoder, SteeringState
from tests.conftest import ASSET_CACHE

pytestmark = pytest.mark.django_db(transaction=True)
CAT = 7


@pytest.fixture
def uncalibrated(tiny_catalog, tmp_path, settings):
    """The test tier copied without calibration.json, registered from the copy."""
    _model, sae = tiny_catalog
    settings.VAR_DIR = tmp_path / "var"
    settings.DEMO_ASSETS_DIR = tmp_path / "assets"
    root = settings.DEMO_ASSETS_DIR / "test"
    shutil.copytree(sae.local_path.rsplit("/", 1)[0], root)
    for found in root.glob("*/calibration.json"):
        found.unlink()
    for row in SparseAutoencoder.objects.filter(is_demo=True):
        SparseAutoencoder.objects.filter(pk=row.pk).update(local_path=str(root / row.local_path.rsplit("/", 1)[1]))
    sae.refresh_from_db()
    return sae


def steer(client):
    response = client.put("/api/steering", json.dumps({"features": [{"index": CAT}], "units": "raw"}),
                          content_type="application/json")
    return response.status_code, response.json()


def test_the_refusal_says_the_calibration_is_running_with_its_progress(client, uncalibrated, inference_worker):
    sae = uncalibrated
    assert client.post(f"/api/models/{sae.model.name}/load").status_code == 200
    assert client.post(f"/api/saes/{sae.name}/attach").status_code == 200
    code, body = steer(client)
    assert code == 422 and "yet" not in body["error"]["message"], body  # nothing running: the plain refusal
    calibration_status_write(sae, "running", phase="kl", done=3, total=10)
    code, body = steer(client)
    assert code == 422 and body["error"]["details"] == {"field": "features.strength"}, body
    message = body["error"]["message"]
    assert f"the calibration of SAE {sae.name} is running (kl 3/10)" in message, message
    assert f"GET /api/saes/{sae.name}/calibration" in message and message.endswith("give a strength")
    page = client.get(f"/steering/?steer={CAT}").content.decode()  # the page says so, and its slider still renders
    assert f'id="calibration-{sae.name}"' in page and "running (kl 3/10)" in page and f'id="steer-{CAT}"' in page
    calibration_status_write(sae, "queued")
    assert f"SAE {sae.name} is queued" in steer(client)[1]["error"]["message"]
    calibration_status_write(sae, "error", message="it failed")
    assert "yet" not in steer(client)[1]["error"]["message"]
    assert 'id="calibration-' not in client.get("/steering/").content.decode()
    assert SteeringState.current().features == []  # refused: nothing changed


def test_serve_queues_the_test_tier_only_when_asked(uncalibrated, settings):
    demo_assets_mark_desired(model=uncalibrated.model, sae=uncalibrated)  # as serve does
    settings.DEMO_CALIBRATION = "auto"  # the test tier's build has no calibration: nothing to finish
    assert demo_calibration_pending(tier="test") == []
    settings.DEMO_CALIBRATION = "background"
    pending = demo_calibration_pending(tier="test")
    assert [s.name for s in pending][0] == uncalibrated.name  # the main (attached) SAE first
    assert len(pending) == SparseAutoencoder.objects.filter(is_demo=True).count() == 2


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_demo_tier_job_computes_the_missing_calibration_with_progress(tmp_path, settings):
    """The demo recipe's path of the job (`calibrate_demo_tier` under the build lock) on a copy of the cached demo
    tier whose layer-6 SAE lacks calibration.json (its KL pass, ≈ 84 CPU s at one thread; the cache is never
    changed): that SAE shows `running` with progress, then `done`, and then has a recommended strength."""
    cached = ASSET_CACHE / "demo"
    if read_manifest(cached) is None or not (cached / "sae_layer_6" / "calibration.json").is_file():
        pytest.skip("needs the built demo tier in the asset cache (make demo); this test never builds it")
    settings.VAR_DIR, settings.DEMO_ASSETS_DIR = tmp_path / "var", tmp_path / "assets"
    copy = settings.DEMO_ASSETS_DIR / "demo"
    copy.mkdir(parents=True)
    (copy / "model").symlink_to(cached / "model")  # only read
    shutil.copy2(cached / "manifest.json", copy / "manifest.json")
    shutil.copytree(cached / "sae", copy / "sae")
    shutil.copytree(cached / "sae_layer_6", copy / "sae_layer_6", ignore=shutil.ignore_patterns("calibration.json"))
    model, main = demo_assets_ensure(tier="demo", calibrate=False)
    demo_assets_mark_desired(model=model, sae=main)
    [second] = demo_calibration_pending(tier="demo")
    assert second.layer == 6 and sae_calibration(second) is None

    outcome: dict = {}
    job = threading.Thread(target=lambda: outcome.update(demo_calibration_run(tier="demo")))
    job.start()
    seen = []
    while job.is_alive():
        status = calibration_status(sae=second)
        seen.append((status["state"], status["phase"], status["done"], status["total"]))
        time.sleep(0.5)
    job.join()
    assert outcome == {"calibrated": [second.name]}, outcome
    running = [s for s in seen if s[0] == "running" and s[3]]
    assert running and running[0][1] == "kl" and all(0 <= s[2] <= s[3] for s in running), seen[:5]
    assert calibration_status(sae=second)["state"] == "done"
    assert sae_calibration(second)["method"]["demo_recipe"] == CALIBRATION_RECIPE_VERSION
    assert feature_recommended_strength(second, 0, "residual_norm") is not None
    assert demo_calibration_pending(tier="demo") == []
