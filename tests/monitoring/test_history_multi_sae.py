"""History of a request monitored with two SAEs attached (test tier, a real inference process in a thread): the
record holds both SAEs' frames, each naming its SAE, in attach order at every position; the detail page shows one
SAE's features at a time (`?sae=`, the first by default) with that SAE's labels; an SAE the record has no frames
of is a 400 page; the JSON export and /api/inspect say whose features each frame holds. A record of one SAE
(frames without `sae`) shows as before."""

from __future__ import annotations

import json
import re

import pytest
from django.db.models import Value
from django.db.models.functions import Concat

from steering.models import FeatureLabel, SparseAutoencoder
from tests.monitoring.conftest import record, store, streamed

pytestmark = pytest.mark.django_db(transaction=True)

PROMPT = "The cat sat on the mat"


@pytest.fixture
def two_saes(two_saes_serving):
    model, late, early = two_saes_serving
    # Each SAE's labels say whose they are, so the page shows which SAE's labels it used.
    for sae in (late, early):
        FeatureLabel.objects.filter(sae=sae).update(label=Concat(Value(f"{sae.name}: "), "label"))
    return model, late, early


def column_labels(html: str) -> list[str]:
    return re.findall(r'<th class="num feature-col" title="#\d+ ([^"]*) \(peak', html)


def test_a_request_monitored_with_two_saes_keeps_both_and_the_page_shows_one_at_a_time(client, two_saes):
    model, late, early = two_saes
    response = client.post("/v1/chat/completions", json.dumps({
        "model": model.name, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "temperature": 0}),
        content_type="application/json")
    assert response.status_code == 200, response.content
    request_id = response["x-request-id"]

    data = client.get(f"/api/monitoring/history/{request_id}").json()["data"]
    frames = data["token_features"]
    inputs = data["prompt_tokens"] + data["completion_tokens"] - 1  # the last generated token is never an input
    assert data["completion_tokens"] == 4
    assert [(f["position"], f["sae"]) for f in frames] == [(t, name) for t in range(inputs)
                                                           for name in (late.name, early.name)]
    assert any(f["features"] for f in frames if f["sae"] == early.name)
    late_frames = [f["features"] for f in frames if f["sae"] == late.name]
    assert late_frames != [f["features"] for f in frames if f["sae"] == early.name]

    # The page: the default SAE's features first, a choice of the other; each with its own labels, one row per token.
    pages = {}
    for query, name in (("", late.name), (f"?sae={early.name}", early.name), (f"?sae={late.name}", late.name)):
        page = client.get(f"/history/{request_id}/{query}")
        assert page.status_code == 200
        html = pages[query] = page.content.decode()
        assert f"Features of SAE <b>{name}</b>" in html
        assert 'id="heatmap-sae-choice"' in html
        assert re.search(rf'class="sae-choice active" data-sae="{re.escape(name)}"', html)
        labels = [label for label in column_labels(html) if label]
        assert labels and all(label.startswith(f"{name}: ") for label in labels), labels
    assert column_labels(pages[""]) == column_labels(pages[f"?sae={late.name}"])
    assert column_labels(pages[""]) != column_labels(pages[f"?sae={early.name}"])
    every_row = client.get(f"/history/{request_id}/?sae={early.name}&special=1").content.decode()
    assert every_row.count('<tr class="token-') == inputs  # one SAE's frames: one row per token, not two
    # The heatmap's options keep the chosen SAE.
    assert f'href="?sae={early.name}&amp;special=1&amp;scale=column"' in every_row
    assert f'href="?sae={early.name}"' in every_row  # hide special tokens

    # An SAE this request has no features of: a clear 400 page, no traceback.
    for bad in ("nope", "../x", "<b>"):
        refused = client.get(f"/history/{request_id}/", {"sae": bad})
        assert refused.status_code == 400
        text = refused.content.decode()
        assert "No such SAE in this request" in text and late.name in text and early.name in text
        assert "<b>'" not in text and "Traceback" not in text

    # The JSON export keeps every frame with its SAE.
    exported = client.get("/api/monitoring/history/export?format=json")
    body = json.loads(streamed(exported))
    mine = next(r for r in body if r["request_id"] == request_id)
    assert mine["token_features"] == frames

    # /api/inspect answers the default SAE's features, one frame per token.
    inspected = client.post("/api/inspect", json.dumps({"text": PROMPT}), content_type="application/json")
    assert inspected.status_code == 200, inspected.content
    tokens = inspected.json()["data"]["tokens"]
    assert [t["position"] for t in tokens] == list(range(len(tokens))) and tokens
    assert {t["sae"] for t in tokens} == {late.name}


def test_a_one_sae_record_shows_as_before_and_refuses_another_sae(client, tiny_catalog):
    model, _ = tiny_catalog
    store([record(1, model_name=model.name,
                  token_features=[{"position": 0, "type": "prompt", "token": "Hi", "features": {"7": 1.5}}])])
    html = client.get("/history/req-00001/").content.decode()
    assert 'id="heatmap-sae-choice"' not in html and '<span class="col-index">#7</span>' in html
    shown = re.search(r"Features of SAE <b>([^<]+)</b>", html).group(1)  # the model's default SAE
    assert client.get(f"/history/req-00001/?sae={shown}").status_code == 200
    other = next(s.name for s in SparseAutoencoder.objects.filter(model=model) if s.name != shown)
    refused = client.get(f"/history/req-00001/?sae={other}")
    assert refused.status_code == 400 and "No such SAE in this request" in refused.content.decode()
