"""Django admin manages the catalog: every changelist, search and the actions work."""

import pytest
from django.contrib.auth.models import User

from catalog.models import ModelStatus
from profiles.models import Profile
from steering.models import FeatureLabel, LabelSource
from tests import factories

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client):
    user = User.objects.create_superuser("admin", "a@example.com", "pw")
    client.force_login(user)
    return client


@pytest.fixture
def catalog():
    model = factories.language_model("tiny", local_path="/nonexistent")
    sae = factories.sparse_autoencoder(model, d_sae=16)
    factories.feature_labels(sae, {5: "cats"})
    factories.profile("loud")
    return model, sae


@pytest.mark.parametrize("path", ["catalog/languagemodel", "steering/sparseautoencoder", "steering/featurelabel",
                                  "profiles/profile", "monitoring/requestrecord"])
def test_changelists_render(admin_client, catalog, path):
    response = admin_client.get(f"/admin/{path}/")
    assert response.status_code == 200


def test_label_search_finds_by_text(admin_client, catalog):
    response = admin_client.get("/admin/steering/featurelabel/", {"q": "cats"})
    assert response.status_code == 200 and b"cats" in response.content


def test_verify_files_action_flags_missing_model(admin_client, catalog):
    model, _ = catalog
    admin_client.post("/admin/catalog/languagemodel/", {"action": "verify_files", "_selected_action": [model.pk]})
    model.refresh_from_db()
    assert model.status == ModelStatus.ERROR


def test_activate_action_makes_one_profile_active(admin_client, catalog):
    loud = Profile.objects.get(name="loud")
    admin_client.post("/admin/profiles/profile/", {"action": "activate", "_selected_action": [loud.pk]})
    loud.refresh_from_db()
    assert loud.is_active


def test_editing_a_label_marks_it_manual(admin_client, catalog):
    label = FeatureLabel.objects.get()
    response = admin_client.post(f"/admin/steering/featurelabel/{label.pk}/change/",
                                 {"sae": label.sae_id, "index": 5, "label": "felines", "description": "",
                                  "source": LabelSource.AUTO, "max_activation": ""})
    assert response.status_code == 302
    label.refresh_from_db()
    assert (label.label, label.source) == ("felines", LabelSource.MANUAL)
