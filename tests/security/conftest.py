import pytest

KEY = "s3cret-key"


@pytest.fixture
def keyed(settings):
    """MILLM_API_KEY set: everything but the probes, the login page and admin needs it."""
    settings.MILLM_API_KEY = KEY
    settings.INFERENCE_TIMEOUT_S = 0.2
    return KEY


@pytest.fixture
def logged_in(client, keyed):
    response = client.post("/login/", {"key": keyed, "next": "/"})
    assert response.status_code == 302
    return client
