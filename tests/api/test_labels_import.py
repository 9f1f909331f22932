"""Feature labels from a Neuronpedia-style explanations export, JSON or CSV; hand edits survive."""

import json

import pytest

from catalog.models import LanguageModel
from steering.models import FeatureLabel, LabelSource, SparseAutoencoder

pytestmark = pytest.mark.django_db


@pytest.fixture
def sae():
    model = LanguageModel.objects.create(name="tiny", repo_id="org/tiny", hidden_size=8, num_layers=4)
    return SparseAutoencoder.objects.create(name="tiny-sae", model=model, repo_id="r", layer=1,
                                            hook_name="blocks.1.hook_resid_post", d_in=8, d_sae=64)


def upload(client, content: str):
    return client.post("/api/saes/tiny-sae/labels/import", json.dumps({"content": content}),
                       content_type="application/json")


def test_neuronpedia_json_export(client, sae):
    export = [{"modelId": "tiny", "layer": "1-res", "index": "3", "description": "cats and kittens",
               "explanationModelName": "gpt-4o-mini", "typeName": "oai_token-act-pair"},
              {"modelId": "tiny", "layer": "1-res", "index": "9", "description": "the word river"}]
    response = upload(client, json.dumps(export))
    assert response.json()["data"] == {"imported": 2}
    assert dict(sae.labels.values_list("index", "label")) == {3: "cats and kittens", 9: "the word river"}
    assert set(sae.labels.values_list("source", flat=True)) == {LabelSource.NEURONPEDIA}
    found = client.get("/api/saes/tiny-sae/features", {"q": "river"}).json()["data"]
    assert [f["index"] for f in found] == [9]


def test_csv_export_keeps_hand_edits(client, sae):
    FeatureLabel.objects.create(sae=sae, index=5, label="my own words", source=LabelSource.MANUAL)
    response = upload(client, "index,description\n5,auto five\n6,auto six\n")
    assert response.status_code == 200
    assert dict(sae.labels.values_list("index", "label")) == {5: "my own words", 6: "auto six"}


@pytest.mark.parametrize("content,fragment", [
    ("[{\"index\": \"x\", \"description\": \"d\"}]", "is not an integer"),
    ("[{\"index\": 1}]", "no description"),
    ("[{\"index\": 99, \"description\": \"too far\"}]", "outside 0..63"),
    ("{not json", "not valid JSON"),
])
def test_a_bad_file_is_refused_whole(client, sae, content, fragment):
    FeatureLabel.objects.create(sae=sae, index=1, label="before", source=LabelSource.AUTO)
    response = upload(client, content)
    assert response.status_code == 422 and fragment in response.json()["error"]["message"]
    assert list(sae.labels.values_list("label", flat=True)) == ["before"]


def test_an_import_merges_and_keeps_every_statistic(client, sae):
    FeatureLabel.objects.create(sae=sae, index=1, label="old one", source=LabelSource.AUTO, max_activation=4.5)
    FeatureLabel.objects.create(sae=sae, index=2, label="two", source=LabelSource.AUTO, max_activation=2.0)
    FeatureLabel.objects.create(sae=sae, index=5, label="mine", source=LabelSource.MANUAL, max_activation=1.0)
    response = upload(client, json.dumps([{"index": 1, "description": "new one"},
                                          {"index": 9, "description": "nine"}]))
    assert response.status_code == 200 and response.json()["data"] == {"imported": 2}
    rows = {i: (label, source, peak) for i, label, source, peak
            in sae.labels.values_list("index", "label", "source", "max_activation")}
    assert rows == {1: ("new one", LabelSource.NEURONPEDIA, 4.5), 2: ("two", LabelSource.AUTO, 2.0),
                    5: ("mine", LabelSource.MANUAL, 1.0), 9: ("nine", LabelSource.NEURONPEDIA, None)}


@pytest.mark.parametrize("content", [json.dumps([{"index": 4, "description": "a"}, {"index": "4", "description": "b"}]),
                                     "index,description\n3,x\n4,y\n4,z\n"])
def test_a_duplicate_index_refuses_the_file_whole_naming_it(client, sae, content):
    FeatureLabel.objects.create(sae=sae, index=4, label="before", source=LabelSource.AUTO, max_activation=3.0)
    response = upload(client, content)
    assert response.status_code == 422
    assert "feature index 4 is listed twice" in response.json()["error"]["message"]
    assert list(sae.labels.values_list("index", "label", "max_activation")) == [(4, "before", 3.0)]
