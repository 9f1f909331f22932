"""Optional API key (MILLM_API_KEY) for /v1 and /api, answered in each API's own error shape."""

from __future__ import annotations

import hmac

from django.conf import settings
from django.http import JsonResponse

OPEN_PATHS = ("/api/health",)


def presented_key(request) -> str:
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("X-API-Key", "").strip()


class ApiKeyMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        key = settings.MILLM_API_KEY
        path = request.path
        protected = path.startswith(("/v1/", "/api/")) and not path.startswith(OPEN_PATHS)
        if key and protected and not hmac.compare_digest(presented_key(request).encode(), key.encode()):
            return unauthorized(path)
        return self.get_response(request)


def unauthorized(path: str) -> JsonResponse:
    message = "Missing or wrong API key: send 'Authorization: Bearer <MILLM_API_KEY>'."
    if path.startswith("/v1/"):
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                          "code": "invalid_api_key"}}
    else:
        body = {"success": False, "data": None, "error": {"code": "UNAUTHORIZED", "message": message, "details": {}}}
    return JsonResponse(body, status=401)
