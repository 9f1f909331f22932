"""The researcher's workbench pages without a browser: search ranking, sliders, profiles, feature page."""

import pytest

from profiles.models import Profile
from steering.models import FeatureLabel, SaeStatus, SteeringState
from tests import factories

pytestmark = pytest.mark.django_db
HX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def sae():
    sae = factories.sparse_autoencoder(factories.language_model("tiny"), status=SaeStatus.ATTACHED, residual_norm=40.0)
    factories.feature_labels(sae, {3: "' search', ' searched'", 5: "' sea', ' ocean'", 7: "' cat'", 9: "' Paris', ' France'"})
    FeatureLabel.objects.filter(sae=sae, index=3).update(description="the sea of code")
    FeatureLabel.objects.filter(sae=sae, index=7).update(description="cats near Paris")
    return sae


def rows(client, **params):
    html = client.get("/steering/", params, HTTP_HX_TARGET="feature-rows", **HX).content.decode()
    return html, [int(part.split('"', 1)[0]) for part in html.split('class="feature-row" id="feature-')[1:]]


def test_search_ranks_label_words_before_substrings_and_descriptions(client, sae):
    html, found = rows(client, q="sea")
    assert found == [5, 3]  # "sea" is a word in 5's label, a substring of "search" in 3's
    assert "2 features matching" in html and "<mark>sea</mark>" in html
    _, found = rows(client, q="Paris")
    assert found == [9, 7]  # the label match before the description match


def test_search_pages_with_a_count(client, sae):
    factories.feature_labels(sae, {i: f"filler {i}" for i in range(10, 60)})
    html, found = rows(client, q="filler")
    assert len(found) == 25 and "1–25 of 50 features" in html and "next →" in html
    html, found = rows(client, q="filler", page=2)
    assert found[0] == 35 and "26–50 of 50" in html and "← previous" in html and "next →" not in html


def test_search_by_index_puts_that_feature_first(client, sae):
    _, found = rows(client, q="9")
    assert found[0] == 9


def test_a_feature_already_in_the_panel_is_refused(client, sae):
    first = client.get("/steering/slider/7", {"units": "residual_norm"}, **HX)
    assert 'id="steer-7"' in first.content.decode() and 'max="4.0" step="0.01"' in first.content.decode()
    again = client.get("/steering/slider/7", {"index": ["7"], "units": "raw"}, **HX)
    assert again["HX-Retarget"] == "#action-error" and "already in the steering panel" in again.content.decode()
    outside = client.get("/steering/slider/64", **HX)
    assert outside["HX-Retarget"] == "#action-error"


def test_slider_range_follows_the_unit(client, sae):
    raw = client.get("/steering/slider/7", {"units": "raw"}, **HX).content.decode()
    assert 'min="-160.0" max="160.0" step="0.4"' in raw  # 4 × the residual norm, in its hundredths


def test_save_as_profile_from_the_panel_keeps_units_as_raw_strengths(client, sae):
    data = {"index": ["7", "9"], "strength": ["0.5", "-1"], "mode": "additive", "positions": "all",
            "units": "residual_norm", "profile_name": "cats", "profile_description": "more cats"}
    response = client.post("/steering/save-profile", data, **HX)
    assert "Saved profile <b>cats</b>" in response.content.decode()
    profile = Profile.objects.get(name="cats")
    assert sorted((f.index, f.strength, f.label) for f in profile.features.all()) == [
        (7, 20.0, "' cat'"), (9, -40.0, "' Paris', ' France'")]
    assert profile.sae == sae and "#7 0.5, #9 -1 (residual_norm)" in profile.description
    again = client.post("/steering/save-profile", data, **HX)
    assert again["HX-Retarget"] == "#action-error" and "CONFLICT" in again.content.decode()
    bad = client.post("/steering/save-profile", {**data, "profile_name": "a b:c"}, **HX)
    assert "VALIDATION_ERROR: name" in bad.content.decode()
    assert Profile.objects.count() == 1


def test_profiles_rename_edit_delete_in_the_page(client, sae):
    factories.profile("loud", features={7: 3.0}, sae=sae)
    html = client.post("/profiles/loud/edit", {"name": "quiet", "description": "now quieter"}, **HX).content.decode()
    assert 'id="profile-quiet"' in html and "now quieter" in html and "profile-loud" not in html
    factories.profile("other")
    clash = client.post("/profiles/quiet/edit", {"name": "other", "description": ""}, **HX)
    assert "CONFLICT" in clash.content.decode()
    html = client.post("/profiles/quiet/delete", **HX).content.decode()
    assert "profile-quiet" not in html and "Deleted profile quiet" in html
    assert list(Profile.objects.values_list("name", flat=True)) == ["other"]
    export = client.get("/profiles/other/export")
    assert export.json()["name"] == "other" and "attachment" in export["Content-Disposition"]


def test_profile_shows_active_only_while_its_steering_is_applied(client, sae):
    factories.profile("loud", features={7: 3.0}, sae=sae, is_active=True)
    state = SteeringState.current()
    state.sae, state.features, state.source_profile = sae, [{"index": 7, "strength": 3.0}], "loud"
    state.save()
    assert "badge-loaded\">active" in client.get("/profiles/").content.decode()
    assert "profile loud" in client.get("/profiles/").content.decode()  # the nav badge
    state.source_profile, state.features = "", [{"index": 9, "strength": 1.0}]  # changed on the Steering page
    state.save()
    html = client.get("/profiles/").content.decode()
    assert "badge-loaded\">active" not in html and "steering 1 feature" in html


def test_feature_page_shows_label_similar_features_and_steer_link(client, tiny_catalog):
    _, sae = tiny_catalog
    sae.status = SaeStatus.ATTACHED
    sae.save()
    html = client.get(f"/saes/{sae.name}/features/7/").content.decode()
    assert "Feature #7" in html and 'id="similar-features"' in html and "?sae=" in html and "steer=7" in html
    assert html.count("/features/") > 10  # ten similar features link to their pages
    saved = client.post(f"/saes/{sae.name}/features/7/label", {"label": "cats!", "description": "hand"}, **HX)
    assert "feature-label-saved" in saved.content.decode()
    assert FeatureLabel.objects.get(sae=sae, index=7).label == "cats!"
    empty = client.post(f"/saes/{sae.name}/features/7/label", {"label": " "}, **HX)
    assert empty["HX-Retarget"] == "#action-error"
    assert client.get(f"/saes/{sae.name}/features/99999/").status_code == 404
    steering = client.get("/steering/", {"steer": "7"}).content.decode()
    assert 'id="steer-7"' in steering and 'id="steering-dirty" class="warn-box">' in steering


def test_every_page_has_the_system_live_target_favicon_and_offline_docs(client, sae):
    for path in ("/", "/steering/", "/profiles/", "/monitor/", "/history/", "/models/", "/saes/"):
        html = client.get(path).content.decode()
        assert html.count('id="system-live"') == 1, path
        # An alert event swaps into #alert-log out of band on every page; without a target htmx logs an error.
        assert html.count('id="alert-log"') == 1, path
        assert "favicon.svg" in html
    system = client.get("/system/").content.decode()
    assert system.count('id="system-live"') == 1 and system.count('id="alert-log"') == 1
    assert client.get("/favicon.ico")["Location"].endswith("favicon.svg")
    docs = client.get("/api/docs").content.decode()
    assert "/static/ninja/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
