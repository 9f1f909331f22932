"""Steering vectors through /api/vectors, /v1 (per request), the active steering and profiles: a real inference
process (in a thread) serves the test tier. Stored vectors import and export as llama.cpp GGUF and repeng
JSON; the active SAE steering exports as the exact Σ s_i W_dec[i]; a vector of the wrong width and a malformed
GGUF are refused (4xx, the expected width named, nothing stored)."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from engine.control_vector_files import ControlVector, read_control_vector_gguf, write_control_vector_gguf
from inference.process import InferenceWorker
from monitoring.models import RequestRecord
from profiles.models import Profile, SteeringVector

pytestmark = pytest.mark.django_db(transaction=True)

CAT = 7  # the test tier's ' cat' feature
CHAT = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 12, "temperature": 0}


def send(client, method, path, body):
    return getattr(client, method)(path, json.dumps(body), content_type="application/json")


def chat(client, model, steering=None) -> str:
    body = {**CHAT, "model": model, **({"steering": steering} if steering is not None else {})}
    response = send(client, "post", "/v1/chat/completions", body)
    assert response.status_code == 200, response.content
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture
def serving(client, tiny_catalog, inference_worker):
    model, sae = tiny_catalog
    assert client.post(f"/api/models/{model.name}/load").status_code == 200
    return model, sae


def direction(width: int, seed: int = 0, scale: float = 8.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(width)).astype(np.float32)


def import_gguf(client, name: str, vector: ControlVector | bytes):
    data = vector if isinstance(vector, bytes) else write_control_vector_gguf(vector)
    return send(client, "post", "/api/vectors/import",
                {"name": name, "format": "gguf", "content": base64.b64encode(data).decode()})


def test_gguf_and_repeng_import_export_round_trip(client, serving):
    model, _ = serving
    width = model.hidden_size
    original = ControlVector(model_hint="llama", directions={1: direction(width, 1), 2: direction(width, 2)})
    imported = import_gguf(client, "push", original)
    assert imported.status_code == 200, imported.content
    data = imported.json()["data"]
    assert (data["d_model"], data["layers"], data["model"], data["operation"]) == (width, [1, 2], model.name, "add")
    assert [v["name"] for v in client.get("/api/vectors").json()["data"]] == ["push"]

    exported = client.get("/api/vectors/push/export?format=gguf")
    assert exported.status_code == 200 and exported["Content-Type"] == "application/octet-stream"
    back = read_control_vector_gguf(exported.content)
    assert back.layers == [1, 2] and all(np.array_equal(back.directions[n], original.directions[n]) for n in (1, 2))

    repeng = client.get("/api/vectors/push/export?format=repeng").json()
    assert repeng["model_type"] == "llama" and sorted(repeng["directions"]) == ["1", "2"]
    again = send(client, "post", "/api/vectors/import", {"name": "push-repeng", "format": "repeng", "content": repeng})
    assert again.status_code == 200, again.content
    as_gguf = import_gguf(client, "push-b64", exported.content)
    assert as_gguf.status_code == 200, as_gguf.content
    not_base64 = send(client, "post", "/api/vectors/import", {"name": "x", "format": "gguf", "content": "%%%"})
    assert not_base64.status_code == 422 and not SteeringVector.objects.filter(name="x").exists()
    for name in ("push-repeng", "push-b64"):
        copy = read_control_vector_gguf(bytes(SteeringVector.objects.get(name=name).data))
        assert all(np.array_equal(copy.directions[n], original.directions[n]) for n in (1, 2))
    assert client.delete("/api/vectors/push-b64").status_code == 200
    assert client.get("/api/vectors/push-b64").status_code == 404


def test_bad_vectors_are_refused_and_nothing_is_stored(client, serving):
    model, _ = serving
    width = model.hidden_size
    wrong = import_gguf(client, "wide", ControlVector(model_hint="llama", directions={1: direction(width + 3)}))
    assert wrong.status_code == 422, wrong.content
    error = wrong.json()["error"]
    assert error["code"] == "VALIDATION_ERROR" and f"expects {width}" in error["message"]
    assert error["details"]["expected_width"] == width
    deep = import_gguf(client, "deep", ControlVector(model_hint="llama", directions={model.num_layers: direction(width)}))
    assert deep.status_code == 422 and "outside" in deep.json()["error"]["message"]
    for body in (b"GGUF\x03\x00\x00\x00garbage", b"not a gguf", write_control_vector_gguf(
            ControlVector(model_hint="", directions={1: direction(width)}))[:60]):
        response = import_gguf(client, "broken", body)
        assert response.status_code == 422 and response.json()["success"] is False, response.content
        assert "/" not in response.json()["error"]["message"].split("GGUF")[0]  # no server path
    bad_json = send(client, "post", "/api/vectors/import", {"name": "nan", "format": "inline",
                                                            "content": {"1": [1.0] * (width - 1) + ["x"]}})
    assert bad_json.status_code == 422
    assert not SteeringVector.objects.exists()


def test_per_request_vectors_by_value_and_by_name_and_their_refusals(client, serving):
    model, _ = serving
    width = model.hidden_size
    plain = chat(client, model.name)
    values = direction(width, 5)
    raw = chat(client, model.name, {"vectors": [{"layer": 1, "vector": values.tolist(), "strength": 2.0}]})
    assert raw != plain
    assert import_gguf(client, "five", ControlVector(model_hint="llama", directions={1: values})).status_code == 200
    assert chat(client, model.name, {"vectors": [{"name": "five", "strength": 2.0}]}) == raw
    assert chat(client, model.name) == plain  # per request only

    for steering, param in (
        ({"vectors": [{"layer": 1, "vector": [1.0] * (width + 1)}]}, "steering.vectors[0]"),
        ({"vectors": [{"name": "no-such-vector"}]}, "steering.vectors[0].name"),
        ({"vectors": [{"layer": 99, "vector": [1.0] * width}]}, "steering.vectors[0]"),
        ({"vectors": [{"name": "five", "layer": 1, "vector": [1.0] * width}]}, "steering.vectors[0]"),
    ):
        response = send(client, "post", "/v1/chat/completions", {**CHAT, "model": model.name, "steering": steering})
        assert response.status_code == 400, response.content
        assert response.json()["error"]["param"] == param and response.json()["error"]["type"] == "invalid_request_error"
    response = client.post("/v1/chat/completions", json.dumps({**CHAT, "model": model.name}).replace(
        '"temperature": 0', '"temperature": 0, "steering": {"vectors": [{"layer": 1, "vector": [NaN]}]}'),
        content_type="application/json")
    assert response.status_code == 400 and "error" in response.json()


def test_the_active_steering_and_a_profile_add_stored_vectors(client, serving):
    model, _ = serving
    plain = chat(client, model.name)
    values = direction(model.hidden_size, 9)
    assert import_gguf(client, "nine", ControlVector(model_hint="llama", directions={2: values})).status_code == 200
    by_request = chat(client, model.name, {"vectors": [{"name": "nine", "strength": 1.5}]})
    assert by_request != plain

    applied = send(client, "put", "/api/steering", {"vectors": [{"name": "nine", "strength": 1.5}]})
    assert applied.status_code == 200, applied.content
    assert applied.json()["data"]["vectors"] == [{"name": "nine", "strength": 1.5}]
    assert chat(client, model.name) == by_request  # no SAE attached: vectors need none
    refused = send(client, "put", "/api/steering", {"vectors": [{"name": "no-such-vector"}]})
    assert refused.status_code == 404 and SteeringVector.objects.get(name="nine").active_strength == 1.5
    assert client.delete("/api/steering").status_code == 200
    assert chat(client, model.name) == plain and SteeringVector.objects.get(name="nine").active_strength is None

    created = send(client, "post", "/api/profiles", {"name": "nine-up", "model": model.name,
                                                     "vectors": [{"name": "nine", "strength": 1.5}]})
    assert created.status_code == 200, created.content
    assert client.get("/api/profiles/nine-up/export").json()["vectors"] == [{"name": "nine", "strength": 1.5}]
    assert chat(client, f"{model.name}:nine-up") == by_request  # the profile per request
    assert client.post("/api/profiles/nine-up/activate").status_code == 200
    assert chat(client, model.name) == by_request
    missing = send(client, "post", "/api/profiles", {"name": "ghost", "vectors": [{"name": "no-such-vector"}]})
    assert missing.status_code == 404 and not Profile.objects.filter(name="ghost").exists()


def test_the_active_sae_steering_exports_as_its_decoder_sum_and_serves_back(client, serving):
    model, sae = serving
    assert client.post(f"/api/saes/{sae.name}/attach").status_code == 200
    assert send(client, "put", "/api/steering", {"features": [{"index": CAT, "strength": 40.0},
                                                              {"index": 3, "strength": -5.0}]}).status_code == 200
    steered = chat(client, model.name)
    saved = send(client, "post", "/api/vectors/from-steering", {"name": "cat-up"})
    assert saved.status_code == 200, saved.content
    assert saved.json()["data"]["layers"] == [sae.layer] and saved.json()["data"]["source_format"] == "steering"
    exported = read_control_vector_gguf(client.get("/api/vectors/cat-up/export").content)
    W_dec = load_file(str(Path(sae.local_path) / "sae_weights.safetensors"))["W_dec"]
    np.testing.assert_allclose(exported.directions[sae.layer], 40.0 * W_dec[CAT] - 5.0 * W_dec[3], atol=1e-5)
    assert client.delete("/api/steering").status_code == 200
    assert chat(client, model.name, {"vectors": [{"name": "cat-up"}]}) == steered


def test_a_restarted_inference_process_adds_the_active_vectors_with_no_sae(client, serving):
    model, _ = serving
    values = direction(model.hidden_size, 11)
    assert import_gguf(client, "eleven", ControlVector(model_hint="llama", directions={1: values})).status_code == 200
    assert send(client, "put", "/api/steering", {"vectors": [{"name": "eleven", "strength": 2.0}]}).status_code == 200

    fresh = InferenceWorker(channel_layer=None, channel_name="restart-check")
    runtime = fresh.calls.runtime
    try:
        asyncio.run(fresh.calls.restore_desired_state())
        active = runtime.active_steering
        assert active is not None and runtime.active_label == "active" and sorted(active.other_layers) == [1]
        np.testing.assert_allclose(active.other_layers[1].additive_delta.numpy(), 2.0 * values, rtol=1e-6)
    finally:
        runtime.unload()


def test_the_history_keeps_a_vectors_summary_not_its_numbers(client, serving):
    model, _ = serving
    values = direction(model.hidden_size, 13)
    chat(client, model.name, {"vectors": [{"layer": 1, "vector": values.tolist(), "strength": 2.0}]})
    record = RequestRecord.objects.latest("pk")
    [summary] = record.steering["vectors"]
    assert (summary["layer"], summary["strength"], summary["name"]) == (1, 2.0, "")
    assert summary["norm"] == pytest.approx(float(np.linalg.norm(values)), rel=1e-5)
    assert "values" not in json.dumps(record.steering)


def test_exporting_a_steering_that_has_no_additive_vector_is_refused(client, serving):
    model, sae = serving
    nothing = send(client, "post", "/api/vectors/from-steering", {"name": "empty"})
    assert nothing.status_code == 422 and "no active steering" in nothing.json()["error"]["message"]
    assert client.post(f"/api/saes/{sae.name}/attach").status_code == 200
    assert send(client, "put", "/api/steering", {"features": [{"index": CAT, "strength": 5.0}],
                                                 "mode": "clamp"}).status_code == 200
    clamp = send(client, "post", "/api/vectors/from-steering", {"name": "clamped"})
    assert clamp.status_code == 422 and "additive" in clamp.json()["error"]["message"], clamp.content
    assert not SteeringVector.objects.exists()
