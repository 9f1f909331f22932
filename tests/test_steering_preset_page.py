"""The Steering page offers an SAE's recommended steering (issue 11): the checkbox appears only for an SAE
that has one, new sliders start at its strength, and Apply with it saves the recommended layers/direction."""

from __future__ import annotations

import json

import pytest

from steering.models import SaeStatus, SparseAutoencoder
from tests import factories

pytestmark = pytest.mark.django_db

RECOMMENDATION = {"mode": "additive", "positions": "generated_only", "units": "residual_norm", "layers": [0, 1],
                  "direction": "decoder", "recommended_strength": 0.25, "strength_range": [0.1, 0.4]}


@pytest.fixture
def attached(tmp_path):
    sae = factories.sparse_autoencoder(factories.language_model("tiny"), status=SaeStatus.ATTACHED,
                                       local_path=str(tmp_path), residual_norm=10.0)
    factories.feature_labels(sae, {7: "token ' cat'"})
    return sae


def test_no_recommendation_no_checkbox(client, attached):
    page = client.get("/steering/").content.decode()
    assert 'name="preset"' not in page


def test_the_recommendation_is_offered_and_new_sliders_start_at_its_strength(client, attached, tmp_path):
    (tmp_path / "steering.json").write_text(json.dumps(RECOMMENDATION))
    for _ in range(2):  # a second load reads the same (cached) file
        page = client.get("/steering/").content.decode()
        assert 'name="preset" value="recommended"' in page and "layers 0, 1" in page
        assert "generated tokens only" in page and "0.25 × residual norm" in page
    slider = client.get("/steering/slider/7", {"units": "residual_norm"}, HTTP_HX_REQUEST="true").content.decode()
    assert 'value="0.25"' in slider


def test_apply_with_the_preset_is_refused_cleanly_without_an_inference_process(client, attached, tmp_path, settings):
    (tmp_path / "steering.json").write_text(json.dumps(RECOMMENDATION))
    settings.INFERENCE_TIMEOUT_S = 0.3
    response = client.post("/steering/apply", {"index": ["7"], "strength": ["0.25"], "preset": "recommended",
                                               "units": "raw"}, HTTP_HX_REQUEST="true")
    assert "No inference process" in response.content.decode()
    assert SparseAutoencoder.objects.get(pk=attached.pk).status == SaeStatus.ATTACHED
