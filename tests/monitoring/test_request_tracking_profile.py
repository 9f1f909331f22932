"""A request steered by the active profile records that profile in history (issue 12: the Monitor's
"Recent requests" and the history detail showed "—" for a chat the profile had steered)."""

import pytest
from asgiref.sync import async_to_sync

from monitoring.models import RequestRecord
from monitoring.request_tracking import RequestTracker

pytestmark = pytest.mark.django_db(transaction=True)


def track(steering_label: str, profile: str = "") -> RequestRecord:
    tracker = RequestTracker(endpoint="chat.completions", model="tiny", profile=profile, request_id=f"req-{steering_label}")
    tracker.see({"type": "started", "prompt_tokens": 3, "steering": steering_label})
    tracker.see({"type": "done", "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
    async_to_sync(tracker.finish)("completed")
    return RequestRecord.objects.get(request_id=tracker.request_id)


def test_the_active_profile_is_recorded():
    assert track("profile:paris-demo").profile_name == "paris-demo"


def test_a_profile_by_model_name_and_unsteered_requests_keep_theirs():
    assert track("profile:other", profile="chosen").profile_name == "chosen"
    assert track("none").profile_name == "" and track("request").profile_name == ""
