"""The feature page's parts read from the inference process (a real one, in a thread, serving the test
tier): the logit lens of a word feature promotes its word; the running statistics count its tokens."""

from __future__ import annotations

import pytest

from monitoring.models import CaptureSettings
from tests.api.conftest import inference_worker  # noqa: F401 - a real inference process in a thread

pytestmark = pytest.mark.django_db(transaction=True)
HX = {"HTTP_HX_REQUEST": "true"}
CAT = 7  # the test tier's " cat" feature


@pytest.fixture
def serving(client, tiny_catalog, inference_worker):  # noqa: F811
    model, sae = tiny_catalog
    assert client.post(f"/api/models/{model.name}/load").status_code == 200
    assert client.post(f"/api/saes/{sae.name}/attach").status_code == 200
    return model, sae


def test_the_logit_lens_lists_the_word_first_twice_and_refuses_a_bad_index(client, serving):
    _, sae = serving
    for _ in range(2):  # the second read comes from the cached unembedding
        html = client.get(f"/saes/{sae.name}/features/{CAT}/logit-lens", **HX).content.decode()
        promoted = html.split('id="lens-promoted"')[1].split("</table>")[0]
        assert promoted.index("<code> cat</code>") < promoted.index("<code>", promoted.index("<code>") + 1)
        assert 'id="lens-suppressed"' in html and "<code> cat</code>" not in html.split('id="lens-suppressed"')[1]
    outside = client.get(f"/saes/{sae.name}/features/{sae.d_sae}/logit-lens", **HX)
    assert outside["HX-Retarget"] == "#action-error"


def test_running_statistics_count_the_feature_after_a_chat(client, serving):
    model, sae = serving
    before = client.get(f"/saes/{sae.name}/features/{CAT}/live-stats", **HX).content.decode()
    assert "No tokens seen" in before or "Tokens seen" in before
    reply = client.post("/v1/completions", {"model": model.name, "prompt": "In the morning the cat was quiet",
                                            "max_tokens": 2}, content_type="application/json")
    assert reply.status_code == 200, reply.content
    html = client.get(f"/saes/{sae.name}/features/{CAT}/live-stats", **HX).content.decode()
    assert "Tokens seen" in html and "Active ratio" in html
    tokens = int(html.split("Tokens seen</th><td class=\"num\">")[1].split("<")[0])
    assert tokens >= 8


def test_monitor_controls_configure_capture_twice_and_refuse_bad_input(client, serving):
    page = client.get("/monitor/").content.decode()
    assert 'id="monitor-controls"' in page and 'id="monitor-pause"' in page
    html = client.post("/monitor/configure", {"enabled": "on", "top_k": "5", "features": "7, 42"}, **HX).content.decode()
    assert "Capture on, top-5, pinned 7, 42." in html
    row = CaptureSettings.current()
    assert (row.enabled, row.top_k, row.features) == (True, 5, [7, 42])
    html = client.post("/monitor/configure", {"top_k": "12", "features": ""}, **HX).content.decode()
    assert "Capture off, top-12." in html and 'id="capture-enabled" checked' not in html
    row = CaptureSettings.current()
    assert (row.enabled, row.top_k, row.features) == (False, 12, [])
    for bad in ({"top_k": "x"}, {"top_k": "500"}, {"top_k": "5", "features": "7, cat"}, {"top_k": "5", "features": "-3"}):
        refused = client.post("/monitor/configure", {"enabled": "on", **bad}, **HX)
        assert refused["HX-Retarget"] == "#action-error", bad
    row = CaptureSettings.current()
    assert (row.enabled, row.top_k, row.features) == (False, 12, [])
