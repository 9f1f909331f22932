"""Every page of the nav renders, and the feature search answers htmx with a fragment."""

import pytest

from tests import factories

pytestmark = pytest.mark.django_db


@pytest.fixture
def sae():
    sae = factories.sparse_autoencoder(factories.language_model("tiny"))
    factories.feature_labels(sae, {7: "token ' cat'", 12: "token ' dog'"})
    return sae


@pytest.mark.parametrize("path,title", [("/", "Overview"), ("/models/", "Models"), ("/saes/", "Sparse autoencoders"),
                                        ("/steering/", "Steering"), ("/profiles/", "Profiles"), ("/monitor/", "Monitor")])
def test_nav_pages_render(client, sae, path, title):
    response = client.get(path)
    assert response.status_code == 200
    html = response.content.decode()
    assert f"<h1>{title}</h1>" in html
    for link in ("/models/", "/saes/", "/steering/", "/profiles/", "/monitor/", "/admin/"):
        assert f'href="{link}"' in html
    assert "/static/vendor/htmx.min.js" in html and "/static/vendor/htmx-ext-ws.min.js" in html


def test_feature_search_returns_a_fragment_to_htmx(client, sae):
    response = client.get("/steering/", {"sae": sae.pk, "q": "dog"}, HTTP_HX_REQUEST="true", HTTP_HX_TARGET="feature-rows")
    html = response.content.decode()
    assert "<html" not in html
    assert "dog" in html and "cat" not in html


def test_feature_search_by_index(client, sae):
    html = client.get("/steering/", {"q": "7"}, HTTP_HX_REQUEST="true", HTTP_HX_TARGET="feature-rows").content.decode()
    assert "cat" in html and "dog" not in html


def test_profile_import_from_the_page(client, sae):
    from django.core.files.uploadedfile import SimpleUploadedFile

    good = SimpleUploadedFile("p.json", b'{"version": "1.0", "name": "cats", "features": [{"index": 7, "strength": 3}]}')
    html = client.post("/profiles/import", {"file": good}, HTTP_HX_REQUEST="true").content.decode()
    assert 'id="profiles-table"' in html and "cats" in html
    bad = SimpleUploadedFile("p.json", b'{"version": "9"}')
    response = client.post("/profiles/import", {"file": bad}, HTTP_HX_REQUEST="true")
    assert response["HX-Retarget"] == "#action-error"
    assert "VALIDATION_ERROR: version" in response.content.decode()
