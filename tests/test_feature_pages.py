"""The feature page's computed parts: top contexts built by the worker's task, progress, the logit-lens
and live-statistics fragments without an attached SAE, and every page's load time on the demo data."""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from steering.feature_contexts import contexts_status, feature_corpus_facts, write_status
from steering.models import SaeStatus
from steering.tasks import feature_contexts_build
from tests.monitoring.conftest import many_records, record, store  # noqa: F401 - 1,000 history rows

pytestmark = pytest.mark.django_db
HX = {"HTTP_HX_REQUEST": "true"}
CAT = 7  # the test tier's " cat" feature


@pytest.fixture
def built(tiny_catalog, settings, tmp_path):
    """The test tier's contexts, computed by the task itself (as the worker runs it) on a small corpus."""
    settings.VAR_DIR = tmp_path
    torch.set_num_threads(1)
    _, sae = tiny_catalog
    # History comes first in the corpus (the demo corpus has none of the test tier's words).
    store([record(5000 + i, prompt=f"In the morning the {word} was quiet and the old road was long. ", output="The cat sat.")
           for i, word in enumerate(["cat", "moon", "river", "cat", "dog", "cat"])]
          + [record(5100 + i, prompt=f"{opening} the small cat slept by the door of the house. ", output="Yes.")
             for i, opening in enumerate(["At noon", "Late at night", "Every winter"])])
    started = time.perf_counter()
    status = feature_contexts_build(sae_name=sae.name, max_tokens=4000)
    return sae, status, time.perf_counter() - started


def test_the_task_computes_contexts_that_highlight_the_word(built):
    sae, status, seconds = built
    assert status["state"] == "done" and status["done"] > 1000 and seconds < 60
    facts = feature_corpus_facts(sae=sae, index=CAT)
    assert facts["fired"] > 0 and 0 < facts["density"] < 0.2 and len(facts["contexts"]) >= 3
    for context in facts["contexts"]:
        (peak,) = [t for t in context["tokens"] if t["peak"]]
        assert peak["text"] == " cat" and peak["value"] == context["value"] and peak["shade"] > 0
    values = [c["value"] for c in facts["contexts"]]
    assert values == sorted(values, reverse=True)
    # Three history rows hold the same sentence: its context is shown once.
    windows = [tuple(t["text"] for t in c["tokens"]) for c in facts["contexts"]]
    assert len(set(windows)) == len(windows), windows
    assert sum(b["count"] for b in facts["histogram"]) == facts["fired"]


def test_the_feature_page_shows_the_contexts_once_computed(client, built):
    sae, _, _ = built
    html = client.get(f"/saes/{sae.name}/features/{CAT}/").content.decode()
    assert 'id="top-contexts"' in html and 'class="ctx-tok ctx-peak"' in html and "compute-contexts" not in html
    assert 'id="activation-histogram"' in html


def test_before_a_build_the_page_offers_it_and_shows_progress_while_it_runs(client, tiny_catalog, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    _, sae = tiny_catalog
    html = client.get(f"/saes/{sae.name}/features/{CAT}/").content.decode()
    assert 'id="compute-contexts"' in html and "top-contexts" not in html
    write_status(sae, "running", done=250, total=1000)
    fragment = client.get(f"/saes/{sae.name}/features/{CAT}/contexts", **HX).content.decode()
    assert "250 / 1000 tokens" in fragment and 'value="25"' in fragment and 'hx-trigger="every 1s"' in fragment
    write_status(sae, "error", message="The contexts could not be computed: SaeIncompatibleError")
    fragment = client.get(f"/saes/{sae.name}/features/{CAT}/contexts", **HX).content.decode()
    assert 'id="contexts-error"' in fragment and "every 1s" not in fragment and 'id="compute-contexts"' in fragment
    assert contexts_status(sae=sae)["state"] == "error"


def test_fragments_of_a_detached_sae_say_what_to_do_and_bad_indices_are_refused(client, tiny_catalog):
    _, sae = tiny_catalog
    assert sae.status != SaeStatus.ATTACHED
    lens = client.get(f"/saes/{sae.name}/features/{CAT}/logit-lens", **HX)
    assert lens.status_code == 200 and "Attach tiny" in lens.content.decode() or "Attach" in lens.content.decode()
    live = client.get(f"/saes/{sae.name}/features/{CAT}/live-stats", **HX).content.decode()
    assert "while the SAE is attached" in live
    outside = client.get(f"/saes/{sae.name}/features/{sae.d_sae}/logit-lens", **HX)
    assert outside["HX-Retarget"] == "#action-error" and "outside" in outside.content.decode()
    refused = client.post(f"/saes/{sae.name}/features/{sae.d_sae}/contexts/build", **HX)
    assert refused["HX-Retarget"] == "#action-error"


def median_ms(client, url: str, runs: int = 5) -> float:
    assert client.get(url).status_code == 200  # warm
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        response = client.get(url)
        timings.append(1000 * (time.perf_counter() - started))
        assert response.status_code == 200, url
    return statistics.median(timings)


def test_pages_load_under_200_ms_and_the_feature_page_under_300_ms(client, built, many_records):  # noqa: F811
    sae, _, _ = built
    pages = ["/", "/models/", "/saes/", "/steering/", "/steering/?q=cat", "/profiles/", "/monitor/", "/history/",
             "/system/", f"/history/{many_records[0].request_id}/"]
    slow = {url: ms for url in pages if (ms := median_ms(client, url)) > 200}
    feature_ms = median_ms(client, f"/saes/{sae.name}/features/{CAT}/")
    assert not slow, slow
    assert feature_ms < 300, feature_ms
