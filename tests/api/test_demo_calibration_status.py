"""While the demo's calibration runs in the background (issue 11), a feature sent without a strength on an SAE not
yet calibrated is refused with a message that says so, with its progress; which demo SAEs `serve` queues."""

from __future__ import annotations

import json
import shutil

import pytest

from catalog.demo import demo_assets_mark_desired, demo_calibration_pending
from steering.calibration_services import calibration_status_write
from steering.models import SparseAutoencoder, SteeringState

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
    calibration_status_write(sae, "queued")
    assert f"SAE {sae.name} is queued" in steer(client)[1]["error"]["message"]
    calibration_status_write(sae, "error", message="it failed")
    assert "yet" not in steer(client)[1]["error"]["message"]
    assert SteeringState.current().features == []  # refused: nothing changed


def test_serve_queues_the_test_tier_only_when_asked(uncalibrated, settings):
    demo_assets_mark_desired(model=uncalibrated.model, sae=uncalibrated)  # as serve does
    settings.DEMO_CALIBRATION = "auto"  # the test tier's build has no calibration: nothing to finish
    assert demo_calibration_pending(tier="test") == []
    settings.DEMO_CALIBRATION = "background"
    pending = demo_calibration_pending(tier="test")
    assert [s.name for s in pending][0] == uncalibrated.name  # the main (attached) SAE first
    assert len(pending) == SparseAutoencoder.objects.filter(is_demo=True).count() == 2
