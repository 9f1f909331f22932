import pytest

from catalog.models import LanguageModel, ModelStatus
from catalog.services import model_set_desired_loaded, model_verify_files
from millm_site.errors import ValidationFailed
from profiles.models import Profile
from profiles.services import profile_activate
from steering.models import FeatureLabel, LabelSource
from steering.sae_services import feature_labels_replace, sae_register
from tests import factories

pytestmark = pytest.mark.django_db


@pytest.fixture
def model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    return factories.language_model("m", local_path=str(tmp_path))


def register(model, **overrides):
    fields = dict(name="s", model=model, repo_id="org/s", sae_id="l1", layer=1, hook_name="blocks.1.hook_resid_post",
                  d_in=8, d_sae=16, architecture="standard", local_path="/x")
    return sae_register(**{**fields, **overrides})


def test_sae_register_rejects_a_hidden_size_mismatch_and_saves_nothing(model):
    with pytest.raises(ValidationFailed, match="d_in 9 does not match m's hidden size 8"):
        register(model, d_in=9)
    assert not model.saes.exists()


def test_sae_register_rejects_a_layer_beyond_the_model(model):
    with pytest.raises(ValidationFailed, match="layer 4 is outside"):
        register(model, layer=4)


def test_sae_register_is_idempotent(model):
    first = register(model)
    second = register(model, d_sae=32)
    assert first.pk == second.pk and second.d_sae == 32


def test_label_replace_keeps_hand_edited_labels(model):
    sae = register(model)
    FeatureLabel.objects.create(sae=sae, index=2, label="my careful label", source=LabelSource.MANUAL)
    kept = feature_labels_replace(sae=sae, labels=[(1, "auto one", "", 3.5), (2, "auto two", "", None)])
    assert kept == 1
    labels = dict(sae.labels.values_list("index", "label"))
    assert labels == {1: "auto one", 2: "my careful label"}
    assert sae.labels.get(index=1).max_activation == 3.5


def test_label_replace_refuses_out_of_range_indices_whole(model):
    sae = register(model)
    feature_labels_replace(sae=sae, labels=[(0, "zero", "", None)])
    with pytest.raises(ValidationFailed, match="Feature index 16 is outside 0..15"):
        feature_labels_replace(sae=sae, labels=[(1, "one", "", None), (16, "too far", "", None)])
    assert list(sae.labels.values_list("label", flat=True)) == ["zero"]


def test_verify_files_marks_missing_folders_as_error(model, tmp_path):
    assert model_verify_files(model=model)
    model.local_path = str(tmp_path / "gone")
    model.save()
    assert not model_verify_files(model=model)
    model.refresh_from_db()
    assert model.status == ModelStatus.ERROR and "gone" in model.status_message


def test_desired_loaded_moves_between_models(model):
    other = LanguageModel.objects.create(name="n", repo_id="org/n")
    model_set_desired_loaded(model=model)
    model_set_desired_loaded(model=other)
    assert list(LanguageModel.objects.filter(desired_loaded=True).values_list("name", flat=True)) == ["n"]
    model_set_desired_loaded(model=None)
    assert not LanguageModel.objects.filter(desired_loaded=True).exists()


def test_profile_activation_is_exclusive():
    a = Profile.objects.create(name="a")
    b = Profile.objects.create(name="b")
    profile_activate(profile=a)
    profile_activate(profile=b)
    assert list(Profile.objects.filter(is_active=True).values_list("name", flat=True)) == ["b"]
