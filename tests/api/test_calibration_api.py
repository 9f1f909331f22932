"""Per-feature calibrated strengths (issue 11) on the test tier: the worker task's body computes calibration.json
for a copy of the test SAE (its real model, no mocks); the features API shows every unit with the documented
relation to raw; the recommended raw strength moves the next-token distribution by the recorded target KL
(checked with a hand-steered forward pass); a feature given without a strength gets its calibrated one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from engine.calibration import KL_PROMPTS
from engine.chat import build_chat_prompt
from engine.loading import load_model
from steering.calibration_services import calibration_status, sae_calibrate_run, sae_calibration
from steering.models import SparseAutoencoder, SteeringState

pytestmark = pytest.mark.django_db(transaction=True)

CAT = 7  # the test tier's ' cat' feature


@pytest.fixture
def calibrated(tiny_catalog, tmp_path, settings):
    model, sae = tiny_catalog
    settings.VAR_DIR = tmp_path / "var"
    folder = tmp_path / "sae"
    shutil.copytree(sae.local_path, folder)
    SparseAutoencoder.objects.filter(pk=sae.pk).update(local_path=str(folder))
    sae.refresh_from_db()
    status = sae_calibrate_run(sae=sae)
    assert status["state"] == "done", status
    return model, sae


def test_every_feature_gets_a_strength_in_every_unit(client, calibrated):
    _model, sae = calibrated
    data = sae_calibration(sae)
    assert data["recipe"]["direction"] == "decoder" and len(data["recommended"]) == sae.d_sae
    assert calibration_status(sae=sae)["state"] == "done"
    rows = client.get(f"/api/saes/{sae.name}/features?q=cat").json()["data"]
    row = next(r for r in rows if r["index"] == CAT)
    raw, by_norm = row["strengths"]["raw"], row["strengths"]["residual_norm"]
    assert 0 < raw["low"] < raw["recommended"] < raw["high"]
    assert by_norm["recommended"] == pytest.approx(raw["recommended"] / sae.residual_norm, rel=1e-3)
    if row["max_activation"]:
        assert row["strengths"]["max_activation"]["recommended"] == pytest.approx(
            raw["recommended"] / row["max_activation"], rel=1e-3)
    assert row["calibration_source"] == "kl"
    assert row["recommended_units"] == "raw" and row["recommended_strength"] == raw["recommended"]
    status = client.get(f"/api/saes/{sae.name}/calibration").json()["data"]
    assert status["calibrated"] is True and status["state"] == "done"


def test_the_recommended_strength_moves_the_next_token_by_the_target_kl(calibrated):
    """The documented meaning: at the recommended raw strength, the decoder row added at the last position of
    the calibration prompts moves the next-token distribution by `target_kl` (mean over the prompts)."""
    _model, sae = calibrated
    data = sae_calibration(sae)
    target, strength = data["method"]["target_kl"], data["recommended"][CAT]
    loaded = load_model(sae.model.local_path)
    from safetensors.torch import load_file

    decoder_row = load_file(str(Path(sae.local_path) / "sae_weights.safetensors"))["W_dec"][CAT]
    layer = loaded.model.model.layers[sae.layer]
    kls = []
    for text in KL_PROMPTS:
        ids = torch.tensor([build_chat_prompt(loaded.tokenizer, [{"role": "user", "content": text}]).token_ids])

        def add(_m, _a, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[:, -1] += strength * decoder_row
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        with torch.no_grad():
            plain = loaded.model(input_ids=ids).logits[0, -1].log_softmax(-1)
            handle = layer.register_forward_hook(add)
            steered = loaded.model(input_ids=ids).logits[0, -1].log_softmax(-1)
            handle.remove()
        kls.append(float((steered.exp() * (steered - plain)).sum()))
    # Interpolated between two measured strengths: near the target, not exactly on it.
    assert sum(kls) / len(kls) == pytest.approx(target, rel=0.35)


def test_a_feature_without_a_strength_gets_its_recommended_one(client, calibrated, inference_worker):
    model, sae = calibrated
    assert client.post(f"/api/models/{model.name}/load").status_code == 200
    assert client.post(f"/api/saes/{sae.name}/attach").status_code == 200
    body = {"features": [{"index": CAT}], "units": "residual_norm"}
    response = client.put("/api/steering", json.dumps(body), content_type="application/json")
    assert response.status_code == 200, response.content
    expected = sae_calibration(sae)["recommended"][CAT] / sae.residual_norm
    assert SteeringState.current().features[0]["strength"] == pytest.approx(expected, rel=1e-3)


def test_bad_calibration_requests_are_refused(client, tiny_catalog, tmp_path):
    _model, sae = tiny_catalog
    assert client.post("/api/saes/no-such-sae/calibrate").status_code == 404
    assert client.get("/api/saes/no-such-sae/calibration").status_code == 404
    # A feature without a strength, on an SAE with no calibration: a clear 4xx naming the field, nothing set.
    folder = tmp_path / "bare"
    shutil.copytree(sae.local_path, folder)
    (folder / "calibration.json").unlink(missing_ok=True)
    SparseAutoencoder.objects.filter(pk=sae.pk).update(local_path=str(folder))
    response = client.put("/api/steering", json.dumps({"features": [{"index": CAT}]}),
                          content_type="application/json")
    assert 400 <= response.status_code < 500, response.content
    assert SteeringState.current().features == []


def test_v1_inline_steering_without_a_strength_uses_the_recommended_one(client, calibrated, inference_worker):
    """/v1 inline steering (`extra_body`) takes the same shortcut as /api/steering: a feature with no strength is
    steered at its calibrated one, so `{"features": [{"index": 7}], "preset": ...}` is the same text as the number
    written out; on an uncalibrated feature it is an OpenAI-shaped 400 naming the field."""
    model, sae = calibrated
    assert client.post(f"/api/models/{model.name}/load").status_code == 200
    assert client.post(f"/api/saes/{sae.name}/attach").status_code == 200

    def chat(feature: dict) -> tuple[int, dict]:
        body = {"model": model.name, "messages": [{"role": "user", "content": "Tell me about pets"}],
                "max_tokens": 8, "temperature": 0, "steering": {"features": [feature], "units": "residual_norm"}}
        response = client.post("/v1/chat/completions", json.dumps(body), content_type="application/json")
        return response.status_code, response.json()

    recommended = sae_calibration(sae)["recommended"][CAT] / sae.residual_norm
    status, implicit = chat({"index": CAT})
    assert status == 200, implicit
    assert chat({"index": CAT, "strength": recommended})[1]["choices"] == implicit["choices"]
    assert chat({"index": CAT, "strength": 0.0})[1]["choices"] != implicit["choices"]  # the strength mattered
    calibration = Path(sae.local_path) / "calibration.json"
    calibration.unlink()
    status, refused = chat({"index": CAT})
    assert status == 400 and refused["error"]["param"] == "steering.features.strength", refused


def test_a_failed_calibration_says_so_in_its_status_without_a_path(client, tiny_catalog, tmp_path, settings):
    """A calibration that fails (here: an SAE file that is not safetensors) ends as `error` in the status the
    API reports, with a message and no server path, instead of staying `running` forever."""
    _model, sae = tiny_catalog
    settings.VAR_DIR = tmp_path / "var"
    folder = tmp_path / "broken"
    shutil.copytree(sae.local_path, folder)
    (folder / "sae_weights.safetensors").write_bytes(b"not safetensors")
    SparseAutoencoder.objects.filter(pk=sae.pk).update(local_path=str(folder))
    sae.refresh_from_db()
    with pytest.raises(Exception):  # noqa: B017 - whatever the loader raises, the task fails (Celery records it)
        sae_calibrate_run(sae=sae)
    status = client.get(f"/api/saes/{sae.name}/calibration").json()["data"]
    assert status["state"] == "error" and status["calibrated"] is False, status
    assert status["message"].startswith("The calibration failed") and "/" not in status["message"], status
