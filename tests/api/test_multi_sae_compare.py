"""Several SAEs in the compare's token diff and in layer-spread steering, through the API with a real inference
process (in a thread) serving the test tier's two SAEs ("late" after block 2, the default; "early" after block 1)."""

from __future__ import annotations

import json

import pytest

from steering.models import FeatureLabel

pytestmark = pytest.mark.django_db(transaction=True)

CAT = 7  # ' cat' in both test-tier SAEs
MOON = 42
CHAT = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 12, "temperature": 0}
SPREAD = [0, 1, 2, 3]


def send(client, method, path, body):
    return getattr(client, method)(path, json.dumps(body), content_type="application/json")


def chat(client, model, **extra) -> str:
    response = send(client, "post", "/v1/chat/completions", {**CHAT, "model": model, **extra})
    assert response.status_code == 200, response.content
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture
def serving(two_saes_serving):
    return two_saes_serving


def test_features_of_both_saes_with_layers_are_accepted_and_change_the_text(client, serving):
    model, late, early = serving
    plain = chat(client, model.name)
    features = [{"index": CAT, "strength": 8.0}, {"sae": early.name, "index": MOON, "strength": 8.0}]
    response = send(client, "put", "/api/steering", {"features": features, "layers": SPREAD})
    assert response.status_code == 200, response.content
    data = response.json()["data"]
    assert data["layers"] == SPREAD and {f.get("sae", late.name) for f in data["features"]} == {late.name, early.name}
    steered = chat(client, model.name)
    assert steered != plain
    # The same inline (/v1 extra_body) on a clean slate gives the same text; without the spread another one.
    assert client.delete("/api/steering").status_code == 200
    assert chat(client, model.name, steering={"features": features, "layers": SPREAD}) == steered
    assert chat(client, model.name, steering={"features": features}) != steered
    # What cannot spread stays a clear 4xx, and nothing is applied.
    bad = send(client, "put", "/api/steering", {"features": features, "layers": [1, 9]})
    assert bad.status_code in (400, 422) and bad.json()["error"]["code"] == "VALIDATION_ERROR", bad.content
    inline = send(client, "post", "/v1/chat/completions", {**CHAT, "model": model.name,
                                                            "steering": {"features": features, "layers": [1, 9]}})
    assert inline.status_code == 400 and inline.json()["error"]["param"], inline.content
    assert client.get("/api/steering").json()["data"]["features"] == []


def test_the_compare_diff_lists_changed_features_of_both_saes_with_their_names_and_labels(client, serving):
    model, late, early = serving
    # Only the early SAE's feature is steered (layer 1): the later layer's SAE sees its features change too.
    body = {"prompt": "Hello!", "max_tokens": 12, "features": [{"sae": early.name, "index": MOON, "strength": 20.0}]}
    response = send(client, "post", "/api/steering/compare", body)
    assert response.status_code == 200, response.content
    data = response.json()["data"]
    assert data["steered"]["text"] != data["unsteered"]["text"]
    diff = data["token_diff"]
    assert diff["saes"] == [late.name, early.name]
    changed = diff["top_changed_features"]
    assert {f["sae"] for f in changed} == {late.name, early.name}
    for f in changed:
        label = FeatureLabel.objects.filter(sae__name=f["sae"], index=f["index"]).values_list("label", flat=True).first()
        assert f["label"] == label  # from that SAE's own labels
        assert f["delta"] == pytest.approx(f["after"] - f["before"]) and f["relative_delta"] is not None
    assert any(f["label"] for f in changed if f["sae"] == early.name)
    # Interleaved: the first two are each SAE's largest change.
    assert {f["sae"] for f in changed[:2]} == {late.name, early.name}
    # With `layers` the compare steers both SAEs' features over the spread, and the page names each one's SAE.
    spread = send(client, "post", "/api/steering/compare", {**body, "layers": SPREAD, "features": [
        {"index": CAT, "strength": 8.0}, {"sae": early.name, "index": MOON, "strength": 8.0}]})
    assert spread.status_code == 200, spread.content
    assert spread.json()["data"]["steered"]["text"] != spread.json()["data"]["unsteered"]["text"]
    form = {"index": [MOON], "strength": [20.0], "sae": [early.name], "units": "raw", "prompt": "Hello!",
            "max_tokens": 12}
    page = client.post("/steering/compare", form, HTTP_HX_REQUEST="true").content.decode()
    assert f"(features of {late.name}, {early.name})" in page and "<th>SAE</th>" in page
    assert f'<td class="changed-sae">{late.name}</td>' in page and f'<td class="changed-sae">{early.name}</td>' in page


def test_with_one_sae_attached_the_page_has_no_sae_column(client, tiny_catalog, inference_worker):
    model, late = tiny_catalog
    assert client.post(f"/api/models/{model.name}/load").status_code == 200
    assert client.post(f"/api/saes/{late.name}/attach").status_code == 200
    response = send(client, "post", "/api/steering/compare", {"prompt": "Hello!", "max_tokens": 12,
                                                               "features": [{"index": CAT, "strength": 20.0}]})
    assert response.status_code == 200, response.content
    diff = response.json()["data"]["token_diff"]
    assert diff["saes"] == [late.name] and {f["sae"] for f in diff["top_changed_features"]} == {late.name}
    form = {"index": [CAT], "strength": [20.0], "units": "raw", "prompt": "Hello!", "max_tokens": 12}
    page = client.post("/steering/compare", form, HTTP_HX_REQUEST="true").content.decode()
    assert f"(features of {late.name})" in page and "<th>SAE</th>" not in page
