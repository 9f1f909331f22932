"""The Steering and SAEs pages with two SAEs attached (issue 13): a slider carries its SAE, the same index of two
SAEs is allowed and the same (SAE, index) refused, applied features of both show, "Steer this" from the second
SAE's feature page adds that SAE's feature, and the SAEs page marks the default."""

from __future__ import annotations

import pytest

from steering.models import SaeStatus, SteeringState
from tests import factories

pytestmark = pytest.mark.django_db


@pytest.fixture
def two(tmp_path):
    model = factories.language_model("tiny")
    late = factories.sparse_autoencoder(model, "late", layer=2, status=SaeStatus.ATTACHED, local_path=str(tmp_path),
                                        desired_attached=True, attached_order=0)
    early = factories.sparse_autoencoder(model, "early", layer=1, status=SaeStatus.ATTACHED,
                                         local_path=str(tmp_path), desired_attached=True, attached_order=1)
    factories.feature_labels(late, {7: "late cat"})
    factories.feature_labels(early, {7: "early cat", 5: "early five"})
    return late, early


def test_a_slider_names_its_sae_and_the_same_pair_is_refused_not_the_same_index(client, two):
    added = client.get("/steering/slider/7?add_sae=early&index=7&sae=late").content.decode()
    assert 'id="steer-early-7"' in added and 'name="sae" value="early"' in added and "early cat" in added
    default = client.get("/steering/slider/7?index=7&sae=early").content.decode()
    assert 'id="steer-7"' in default and 'name="sae" value="late"' in default and "late cat" in default
    for query in ("add_sae=early&index=7&sae=early", "index=7&sae=late"):
        refused = client.get(f"/steering/slider/7?{query}").content.decode()
        assert "already in the steering panel" in refused and "slider-row" not in refused
    gone = client.get("/steering/slider/7?add_sae=gone").content.decode()
    assert "not attached" in gone and "slider-row" not in gone
    assert "outside" in client.get("/steering/slider/64?add_sae=early").content.decode()


def test_the_panel_shows_the_applied_features_of_both_saes(client, two):
    late, early = two
    state = SteeringState.current()
    state.sae, state.features = late, [{"index": 7, "strength": 4.0}, {"index": 7, "strength": 2.0, "sae": "early"}]
    state.save()
    page = client.get("/steering/").content.decode()
    assert 'id="steer-7"' in page and 'id="steer-early-7"' in page and 'id="attached-saes"' in page
    assert "late (attached, default)" in page and "early (attached)" in page


def test_steer_this_on_the_second_saes_feature_page_adds_that_saes_feature(client, two):
    late, early = two
    page = client.get(f"/steering/?sae={early.pk}&steer=5").content.decode()
    assert 'id="steer-early-5"' in page and "early five" in page
    page = client.get(f"/steering/?sae={late.pk}&steer=5").content.decode()
    assert 'id="steer-5"' in page and 'id="steer-early-5"' not in page


def test_the_saes_page_marks_the_default(client, two):
    page = client.get("/saes/").content.decode()
    late_row = page[page.index('id="sae-late"'):]
    early_row = page[page.index('id="sae-early"'):page.index('id="sae-late"')]
    assert 'class="sae-default"' in late_row.split("</tr>")[0]
    assert 'class="sae-default"' not in early_row


def test_the_second_saes_feature_page_steers_its_feature_and_says_how_strong(client, two):
    late, early = two
    state = SteeringState.current()
    state.sae, state.features = late, [{"index": 7, "strength": 4.0}, {"index": 7, "strength": 2.5, "sae": "early"}]
    state.save()
    page = client.get("/saes/early/features/7/").content.decode()
    assert 'id="steer-this"' in page and f"?sae={early.pk}&amp;steer=7" in page
    assert "Steered now at <b>2.5</b>" in page
    assert "Steered now at <b>4.0</b>" in client.get("/saes/late/features/7/").content.decode()
