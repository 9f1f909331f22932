"""The Steering and Profiles pages show a feature's condition, the abort conditions and the stored vectors
beside the features (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest
from django.contrib.auth.models import User

from engine.control_vector_files import ControlVector, write_control_vector_gguf
from profiles.models import Profile, ProfileFeature, SteeringVector
from steering.models import SaeStatus, SteeringState
from tests import factories

pytestmark = pytest.mark.django_db


@pytest.fixture
def attached(tmp_path):
    sae = factories.sparse_autoencoder(factories.language_model("tiny"), status=SaeStatus.ATTACHED,
                                       local_path=str(tmp_path))
    factories.feature_labels(sae, {7: "token ' cat'"})
    return sae


def stored_vector(name: str, *, active_strength=None) -> SteeringVector:
    vector = ControlVector(model_hint="llama", directions={1: np.ones(4, dtype=np.float32)})
    return SteeringVector.objects.create(name=name, d_model=4, layers=[1], data=write_control_vector_gguf(vector),
                                         active_strength=active_strength)


def test_the_steering_page_shows_the_active_conditions_and_vectors(client, attached):
    state = SteeringState.current()
    state.sae = attached
    state.features = [{"index": 7, "strength": 4.0, "when": {"index": 88, "above": 3.0}}]
    state.abort_when = [{"index": 101, "above": 0.5, "below": 5.0}]
    state.save()
    stored_vector("calm", active_strength=2.0)
    page = client.get("/steering/").content.decode()
    assert "#7 when #88 &gt; 3 · abort when 0.5 &lt; #101 &lt; 5 · vector calm ×2" in page


def test_the_profiles_page_shows_each_profiles_conditions_and_vectors(client, attached):
    profile = Profile.objects.create(name="gated", sae=attached, abort_when=[{"index": 3, "below": 1.0}],
                                     vectors=[{"name": "calm", "strength": -1.5}])
    ProfileFeature.objects.create(profile=profile, index=7, strength=4.0, when={"sae": "other", "index": 2, "above": 1})
    ProfileFeature.objects.create(profile=profile, index=8, strength=1.0)
    Profile.objects.create(name="plain", sae=attached)
    page = client.get("/profiles/").content.decode()
    assert "#7 when other#2 &gt; 1 · abort when #3 &lt; 1 · vector calm ×-1.5" in page
    assert page.count('class="muted conditions"') == 1  # the plain profile shows none


def test_a_slider_row_shows_its_condition_and_a_bad_one_is_refused_before_anything_applies(client, attached,
                                                                                          settings):
    state = SteeringState.current()
    state.sae, state.features = attached, [{"index": 7, "strength": 4.0, "when": {"index": 88, "above": 3.0}}]
    state.save()
    page = client.get("/steering/").content.decode()
    assert 'name="when" value="#88 &gt; 3"' in page
    settings.INFERENCE_TIMEOUT_S = 0.3
    for text, reason in (("#88 >> 3", "is not a condition like"), ("#99999 > 1", "outside"),
                         ("5 < #88 < 2", "the band is empty")):
        response = client.post("/steering/apply", {"index": ["7"], "strength": ["1"], "when": [text], "units": "raw"},
                               HTTP_HX_REQUEST="true")
        assert reason in response.content.decode(), text
    assert SteeringState.current().features == state.features  # nothing applied


def test_the_admin_lists_and_opens_stored_vectors(client):
    client.force_login(User.objects.create_superuser("admin", "a@example.com", "pw"))
    vector = stored_vector("calm", active_strength=1.0)
    listing = client.get("/admin/profiles/steeringvector/?q=calm")
    assert listing.status_code == 200 and "calm" in listing.content.decode()
    assert client.get(f"/admin/profiles/steeringvector/{vector.pk}/change/").status_code == 200
