"""A refused load changes nothing: the serving model stays loaded and its SAE attached (issue 10).

Loading first unloads whatever serves, so every parameter must be checked before the inference
process hears of the call. A real inference process (in a thread) serves the test-tier model.
"""

from __future__ import annotations

import pytest

from catalog.models import LanguageModel, ModelStatus
from steering.models import SaeStatus, SparseAutoencoder

pytestmark = pytest.mark.django_db(transaction=True)


def state() -> dict:
    return {"models": list(LanguageModel.objects.order_by("pk").values("name", "status", "status_message",
                                                                           "desired_loaded")),
            "saes": list(SparseAutoencoder.objects.order_by("pk").values("name", "status", "desired_attached"))}


@pytest.fixture
def serving(client, tiny_catalog, inference_worker):
    model, sae = tiny_catalog
    assert client.post(f"/api/models/{model.name}/load").status_code == 200
    assert client.post(f"/api/saes/{sae.name}/attach").status_code == 200
    return model, sae


@pytest.mark.parametrize("query,field", [("dtype=bogus", "dtype"), ("quantization=q3", "quantization"),
                                         ("dtype=float32&quantization=Q4", "quantization")])
def test_a_bad_load_parameter_is_refused_before_anything_unloads(client, serving, query, field):
    model, sae = serving
    before = state()
    response = client.post(f"/api/models/{model.name}/load?{query}")
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR" and error["details"]["field"] == field
    assert state() == before
    assert LanguageModel.objects.get(pk=model.pk).status == ModelStatus.LOADED
    assert SparseAutoencoder.objects.get(pk=sae.pk).status == SaeStatus.ATTACHED
    chat = client.post("/v1/chat/completions", {"model": model.name, "max_tokens": 2,
                                                "messages": [{"role": "user", "content": "hi"}]},
                       content_type="application/json")
    assert chat.status_code == 200  # and it still serves


def test_a_gguf_model_is_not_quantized_and_nothing_unloads(client, serving):
    model, _ = serving
    LanguageModel.objects.filter(pk=model.pk).update(gguf_file="model.gguf")
    before = state()
    response = client.post(f"/api/models/{model.name}/load?quantization=q8")
    assert response.status_code == 422 and "GGUF" in response.json()["error"]["message"]
    assert state() == before
