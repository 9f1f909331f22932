"""The Steering page's compare token strip and its Sweep control (issue 11), with a real inference process (in a
thread) serving the test tier."""

from __future__ import annotations

import re

import pytest

from steering.models import SweepRun
from steering.tasks import sweep_run

pytestmark = pytest.mark.django_db(transaction=True)

CAT = 7


@pytest.fixture
def serving(client, tiny_catalog, inference_worker):
    model, sae = tiny_catalog
    assert client.post(f"/api/models/{model.name}/load").status_code == 200
    assert client.post(f"/api/saes/{sae.name}/attach").status_code == 200
    return model, sae


def test_the_compare_panel_shows_the_token_strip_and_the_changed_features(client, serving):
    form = {"index": [CAT], "strength": [2.0], "units": "residual_norm", "prompt": "Hello!", "max_tokens": 12}
    for _ in range(2):  # re-runnable
        page = client.post("/steering/compare", form, HTTP_HX_REQUEST="true").content.decode()
        assert 'id="token-diff"' in page and "Features that changed most" in page
        tokens = re.findall(r'<span class="tok( diverges)?"', page)
        assert len(tokens) == 12 and tokens.count(" diverges") == 1
        assert "steered log-prob" in page and "KL " in page


def test_the_sweep_control_draws_its_chart_inline_or_polls_its_job(client, serving):
    form = {"index": [CAT], "strength": [1.0], "units": "residual_norm", "prompt": "Hello!", "max_tokens": 8}
    page = client.post("/steering/sweep", form, HTTP_HX_REQUEST="true").content.decode()
    assert 'data-status="done"' in page and 'id="sweep-chart"' in page and 'class="sweep-concept"' in page
    assert page.count("<tr") == 1 + 6  # the header, 0 and 0.25 … 4 × the slider
    assert 'id="sweep-recommended"' in page
    # Without a test prompt: 6 strengths × 3 neutral prompts > the inline bound: a job the fragment polls.
    page = client.post("/steering/sweep", {**form, "prompt": ""}, HTTP_HX_REQUEST="true").content.decode()
    assert 'data-status="queued"' in page and 'hx-trigger="every 1s"' in page
    run = SweepRun.objects.order_by("-created_at").first()
    sweep_run(str(run.id))
    page = client.get(f"/steering/sweeps/{run.id}", HTTP_HX_REQUEST="true").content.decode()
    assert 'data-status="done"' in page and 'id="sweep-chart"' in page and "every 1s" not in page


def test_a_feature_page_link_opens_the_steering_page_sweeping_that_feature(client, serving):
    model, sae = serving
    feature = client.get(f"/saes/{sae.name}/features/{CAT}/").content.decode()
    assert f"sweep={CAT}" in feature
    page = client.get(f"/steering/?sae={sae.pk}&sweep={CAT}").content.decode()
    assert 'hx-trigger="click, load"' in page and f'value="{CAT}"' in page
