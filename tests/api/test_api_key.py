import pytest

pytestmark = pytest.mark.django_db


@pytest.fixture
def keyed(settings):
    settings.MILLM_API_KEY = "s3cret"
    settings.INFERENCE_TIMEOUT_S = 0.2


def test_management_api_requires_the_key(client, keyed):
    response = client.get("/api/openapi.json")
    assert response.status_code == 401
    assert response.json() == {"success": False, "data": None, "error": {
        "code": "UNAUTHORIZED", "message": response.json()["error"]["message"], "details": {}}}
    assert client.get("/api/openapi.json", HTTP_AUTHORIZATION="Bearer s3cret").status_code == 200
    assert client.get("/api/openapi.json", HTTP_X_API_KEY="s3cret").status_code == 200


def test_wrong_key_on_v1_gets_an_openai_error(client, keyed):
    response = client.get("/v1/models", HTTP_AUTHORIZATION="Bearer nope")
    assert response.status_code == 401
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"


def test_health_stays_open_for_probes(client, keyed):
    assert client.get("/api/health").status_code == 200


def test_no_key_configured_means_open(client, settings):
    settings.MILLM_API_KEY = ""
    assert client.get("/api/openapi.json").status_code == 200
