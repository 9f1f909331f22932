import pytest

pytestmark = pytest.mark.django_db


def test_health_without_an_inference_process_is_degraded_not_an_error(client, settings):
    settings.INFERENCE_TIMEOUT_S = 0.3
    response = client.get("/api/health")
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True and body["error"] is None
    assert body["data"]["status"] == "degraded"
    assert body["data"]["database"] == "ok" and body["data"]["redis"] == "ok"
    assert body["data"]["inference"]["up"] is False
    assert "No inference process answered" in body["data"]["inference"]["reason"]


def test_health_reports_a_live_inference_process(client, inference_worker):
    body = client.get("/api/health").json()
    assert body["data"]["status"] == "ok"
    assert body["data"]["inference"]["up"] is True
    assert isinstance(body["data"]["inference"]["pid"], int)


def test_health_with_redis_gone_says_so(client, settings):
    settings.REDIS_URL = "redis://127.0.0.1:1"
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "millm_site.channel_layer.OneTripRedisChannelLayer",
                                           "CONFIG": {"hosts": ["redis://127.0.0.1:1"]}}}
    body = client.get("/api/health").json()
    assert body["data"]["redis"] == "unreachable"
    assert body["data"]["status"] == "degraded"


def test_openapi_docs_are_served(client):
    schema = client.get("/api/openapi.json").json()
    assert "/api/health" in schema["paths"]
    assert client.get("/api/docs").status_code == 200
