"""A page on another site must not drive a local miLLM: JSON bodies only, foreign Origins refused."""

import json

import pytest

from profiles.models import Profile

pytestmark = pytest.mark.django_db

PROFILE = {"name": "cats", "features": [{"index": 7, "strength": 3}]}


def test_text_plain_body_is_refused_on_the_management_api(client):
    # text/plain is what a cross-site <form> or fetch() may send without a CORS preflight.
    response = client.post("/api/profiles", json.dumps(PROFILE), content_type="text/plain")
    assert response.status_code == 415
    body = response.json()
    assert body["success"] is False and body["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE"
    assert not Profile.objects.exists()


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
def test_non_json_bodies_are_refused_on_v1_in_the_openai_shape(client, content_type):
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    response = client.post("/v1/chat/completions", body, content_type=content_type)
    assert response.status_code == 415
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "unsupported_media_type"


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8"])
def test_json_bodies_still_work(client, content_type):
    response = client.post("/api/profiles", json.dumps(PROFILE), content_type=content_type)
    assert response.status_code == 200, response.content
    assert Profile.objects.filter(name="cats").exists()


def test_a_bodyless_post_needs_no_content_type(client):
    # README: `curl -X POST .../load` sends no body and no Content-Type.
    client.post("/api/profiles", json.dumps(PROFILE), content_type="application/json")
    response = client.generic("POST", "/api/profiles/cats/activate", b"", content_type="")
    assert response.status_code != 415


def test_a_foreign_origin_is_refused_even_with_json(client):
    response = client.post("/api/profiles", json.dumps(PROFILE), content_type="application/json",
                           HTTP_ORIGIN="http://evil.example")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "FORBIDDEN_ORIGIN"
    assert not Profile.objects.exists()
    v1 = client.get("/v1/models", HTTP_ORIGIN="null")
    assert v1.status_code == 403 and v1.json()["error"]["code"] == "forbidden_origin"


def test_same_origin_and_configured_origins_are_allowed(client, settings):
    ok = client.post("/api/profiles", json.dumps(PROFILE), content_type="application/json",
                     HTTP_ORIGIN="http://testserver")
    assert ok.status_code == 200
    assert client.get("/v1/models", HTTP_ORIGIN="http://ui.example:3000").status_code == 403
    settings.MILLM_ALLOWED_ORIGINS = ["http://ui.example:3000"]
    assert client.get("/v1/models", HTTP_ORIGIN="http://ui.example:3000").status_code == 200


def test_pages_refuse_a_foreign_origin_post(client):
    # Page actions go through Django's CSRF check, which also compares Origin with the host.
    csrf_client = type(client)(enforce_csrf_checks=True)
    response = csrf_client.post("/profiles/import", {}, HTTP_ORIGIN="http://evil.example")
    assert response.status_code == 403


def test_json_text_labelled_multipart_is_refused(client):
    # fetch() may label any body multipart/form-data without a preflight: the JSON inside must not run.
    response = client.generic("POST", "/api/profiles", json.dumps(PROFILE).encode(),
                              content_type="multipart/form-data; boundary=x")
    assert response.status_code == 415
    assert not Profile.objects.exists()
