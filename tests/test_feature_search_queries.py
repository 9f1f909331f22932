"""A broad feature search costs a few queries, not one per matching label (issue 12: "/steering/?q=e" took
3.2 s on the demo SAE's 3,072 labels, each label re-read from the database for its SAE id)."""

import pytest

from steering.models import SaeStatus
from steering.selectors import feature_search_page
from tests import factories

pytestmark = pytest.mark.django_db


def test_a_broad_search_and_the_plain_list_read_the_labels_in_one_query(django_assert_max_num_queries):
    sae = factories.sparse_autoencoder(factories.language_model("tiny"), status=SaeStatus.ATTACHED)
    factories.feature_labels(sae, {i: f"' word{i}', ' sea'" for i in range(300)})
    with django_assert_max_num_queries(2):
        found = feature_search_page(sae=sae, query="e", page_size=25)
    assert found.total == 300 and len(found.items) == 25
    with django_assert_max_num_queries(2):
        listed = feature_search_page(sae=sae, query="", page_size=25)
    assert [f.index for f in listed.items] == list(range(25))
    with django_assert_max_num_queries(0):
        assert [f.sae_id for f in found.items] == [sae.pk] * 25
