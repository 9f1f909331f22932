"""The catalog's rules hold in the database itself, not only in forms."""

import pytest
from django.db import IntegrityError, transaction

from catalog.models import LanguageModel
from profiles.models import Profile, ProfileFeature
from steering.models import FeatureLabel, SparseAutoencoder
from tests import factories

pytestmark = pytest.mark.django_db


@pytest.fixture
def model():
    return factories.language_model("m", num_layers=2)


@pytest.fixture
def sae(model):
    return factories.sparse_autoencoder(model, "s", d_sae=16)


def assert_rejected(create):
    with pytest.raises(IntegrityError), transaction.atomic():
        create()


def test_feature_label_is_unique_per_sae_and_index(sae):
    FeatureLabel.objects.create(sae=sae, index=3, label="a")
    assert_rejected(lambda: FeatureLabel.objects.create(sae=sae, index=3, label="b"))


def test_profile_feature_is_unique_per_profile(model):
    profile = Profile.objects.create(name="p")
    ProfileFeature.objects.create(profile=profile, index=1, strength=2.0)
    assert_rejected(lambda: ProfileFeature.objects.create(profile=profile, index=1, strength=3.0))


def test_profile_feature_strength_is_bounded():
    profile = Profile.objects.create(name="p")
    assert_rejected(lambda: ProfileFeature.objects.create(profile=profile, index=1, strength=1e9))


def test_only_one_profile_is_active():
    Profile.objects.create(name="a", is_active=True)
    assert_rejected(lambda: Profile.objects.create(name="b", is_active=True))


def test_only_one_model_is_desired_loaded(model):
    model.desired_loaded = True
    model.save()
    assert_rejected(lambda: LanguageModel.objects.create(name="n", repo_id="org/n", desired_loaded=True))


def test_sae_dimensions_must_be_positive(model):
    assert_rejected(lambda: SparseAutoencoder.objects.create(name="z", model=model, repo_id="r", layer=0,
                                                             hook_name="h", d_in=0, d_sae=16))


def test_model_status_must_be_known():
    assert_rejected(lambda: LanguageModel.objects.create(name="x", repo_id="org/x", status="exploded"))


def test_deleting_a_model_removes_its_saes_and_labels(model, sae):
    FeatureLabel.objects.create(sae=sae, index=0, label="a")
    model.delete()
    assert not SparseAutoencoder.objects.exists()
    assert not FeatureLabel.objects.exists()
