"""With MILLM_API_KEY set every page, page action and the history export need the key (a login session)."""

import pytest

from catalog.models import LanguageModel
from monitoring.models import RequestRecord
from tests.monitoring.conftest import streamed

pytestmark = pytest.mark.django_db

PAGES = ["/", "/models/", "/saes/", "/steering/", "/profiles/", "/monitor/", "/history/", "/system/",
         "/history/export?format=csv", "/history/export?format=json"]


@pytest.fixture
def secret_prompt():
    RequestRecord.objects.create(request_id="req-1", endpoint="chat.completions", model_name="tiny",
                                 status="completed", prompt="my secret prompt", output="an answer")
    return "my secret prompt"


@pytest.mark.parametrize("path", PAGES)
def test_pages_redirect_to_the_login_without_the_key(client, keyed, secret_prompt, path):
    response = client.get(path)
    assert response.status_code == 302
    assert response["Location"].startswith("/login/?next=")
    assert secret_prompt not in response.content.decode()


def test_history_export_is_served_after_login(logged_in, secret_prompt):
    response = logged_in.get("/history/export?format=csv")
    assert response.status_code == 200
    assert secret_prompt in streamed(response).decode()


def test_htmx_requests_are_sent_to_the_login_page(client, keyed):
    response = client.get("/steering/", HTTP_HX_REQUEST="true")
    assert response.status_code == 401
    assert response["HX-Redirect"].startswith("/login/?next=")


def test_page_posts_change_nothing_without_the_key(client, keyed):
    LanguageModel.objects.create(name="tiny", repo_id="org/tiny")
    response = client.post("/models/tiny/load", HTTP_HX_REQUEST="true")
    assert response.status_code == 401
    assert LanguageModel.objects.get(name="tiny").desired_loaded is False


def test_wrong_key_is_refused_and_logs_nobody_in(client, keyed):
    response = client.post("/login/", {"key": "nope", "next": "/"})
    assert response.status_code == 403
    assert "wrong key" in response.content.decode().lower()
    assert client.get("/").status_code == 302


def test_login_sends_back_to_the_page_asked_for_and_logout_ends_it(client, keyed):
    page = client.get("/login/?next=/history/")
    assert page.status_code == 200 and 'name="key"' in page.content.decode()
    response = client.post("/login/", {"key": keyed, "next": "/history/"})
    assert response.status_code == 302 and response["Location"] == "/history/"
    assert client.get("/history/").status_code == 200
    assert client.post("/logout/").status_code == 302
    assert client.get("/history/").status_code == 302


def test_login_never_redirects_off_site(client, keyed):
    response = client.post("/login/", {"key": keyed, "next": "https://evil.example/"})
    assert response["Location"] == "/"


def test_a_session_may_call_the_api_the_pages_use(logged_in):
    assert logged_in.get("/api/openapi.json").status_code == 200
    assert logged_in.get("/api/monitoring/history").status_code == 200


def test_a_session_from_before_a_key_change_is_no_longer_valid(logged_in, settings):
    settings.MILLM_API_KEY = "another-key"
    assert logged_in.get("/").status_code == 302
    assert logged_in.get("/api/openapi.json").status_code == 401


def test_probes_stay_open_and_admin_keeps_django_auth(client, keyed):
    assert client.get("/api/health").status_code == 200
    assert client.get("/metrics").status_code == 200
    admin = client.get("/admin/")
    assert admin.status_code == 302 and admin["Location"].startswith("/admin/login/")


def test_without_a_key_pages_stay_open(client, settings):
    settings.MILLM_API_KEY = ""
    assert client.get("/").status_code == 200
    assert client.get("/history/export?format=csv").status_code == 200
