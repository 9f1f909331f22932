"""Who may use miLLM: the API key everywhere, and no cross-site calls.

- With `MILLM_API_KEY` set, `/v1` and `/api` take it by header (`Authorization: Bearer`, `X-API-Key`)
  or from a browser session that logged in at /login/; pages and page actions need that session
  (a page redirects to /login/, an htmx call is told to go there). Open: /api/health and /metrics
  (probes), the login page, and /admin/ (Django's own auth).
- A local server is reachable from any page the browser opens, and a `text/plain` POST needs no CORS
  preflight: so `/v1` and `/api` refuse a foreign `Origin` (403) and take only JSON bodies (415),
  whether or not a key is set. Pages are covered by Django's CSRF check, which compares Origin too.
Each refusal is one WARNING line from `django.request`, in each API's own error shape.
"""

from __future__ import annotations

import hmac
from urllib.parse import quote, urlsplit

from django.conf import settings
from django.http import HttpResponseRedirect, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.utils.crypto import salted_hmac

from millm_site.envelope import error_envelope

LOGIN_PATH = "/login/"
OPEN_PATHS = ("/api/health", "/metrics", LOGIN_PATH, "/admin/", "/static/", "/favicon.ico")
API_PREFIXES = ("/v1/", "/api/")
BODY_METHODS = ("POST", "PUT", "PATCH")
SESSION_KEY = "millm_key_digest"
_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


# --- the key --------------------------------------------------------------------------------------


def presented_key(headers) -> str:
    """The key sent by header; `headers` is any case-insensitive mapping (request.headers)."""
    auth = headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("X-API-Key", "").strip()


def key_matches(presented: str) -> bool:
    key = settings.MILLM_API_KEY
    return bool(key) and hmac.compare_digest(presented.encode(), key.encode())


def key_digest() -> str:
    """What a logged-in session holds: a digest of the current key, so changing the key logs everyone out."""
    return salted_hmac("millm.login", settings.MILLM_API_KEY).hexdigest()


def session_has_key(session) -> bool:
    if not settings.MILLM_API_KEY or session is None:
        return False
    return hmac.compare_digest(str(session.get(SESSION_KEY, "")), key_digest())


# --- origins --------------------------------------------------------------------------------------


def _host_port(scheme: str, netloc: str) -> str:
    netloc = netloc.lower()
    default = _DEFAULT_PORTS.get(scheme)
    if default and netloc.endswith(f":{default}") and not netloc.endswith("]"):
        netloc = netloc[: -len(default) - 1]
    return netloc


def origin_allowed(origin: str, host: str, *, secure: bool = False) -> bool:
    """Same origin as the Host the request came to, or listed in MILLM_ALLOWED_ORIGINS ("null" never is)."""
    origin = origin.strip().rstrip("/").lower()
    if origin in settings.MILLM_ALLOWED_ORIGINS:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc or not host:
        return False
    scheme = "https" if secure else "http"
    return _host_port(parts.scheme, parts.netloc) == _host_port(scheme, host)


# --- answers --------------------------------------------------------------------------------------


def api_error(path: str, *, status: int, code: str, message: str) -> JsonResponse:
    if path.startswith("/v1/"):
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code.lower()}}
    else:
        body = error_envelope(code.upper(), message)
    return JsonResponse(body, status=status)


def unauthorized(path: str) -> JsonResponse:
    return api_error(path, status=401, code="invalid_api_key" if path.startswith("/v1/") else "UNAUTHORIZED",
                     message="Missing or wrong API key: send 'Authorization: Bearer <MILLM_API_KEY>'.")


def login_redirect(request):
    target = f"{LOGIN_PATH}?next={quote(request.get_full_path(), safe='/')}"
    if request.headers.get("HX-Request") or request.method not in ("GET", "HEAD"):
        # htmx follows HX-Redirect with a full page load; a plain 302 would swap the login page into a fragment.
        response = JsonResponse({"detail": "log in first"}, status=401)
        response["HX-Redirect"] = target
        return response
    return HttpResponseRedirect(target)


def _has_body(request) -> bool:
    return _length(request) > 0 or "HTTP_TRANSFER_ENCODING" in request.META


def _is_json(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def _empty_form(request) -> bool:
    """A multipart body with no part at all (an empty FormData; Django's test client's bare POST)."""
    boundary = request.content_params.get("boundary", "")
    if request.content_type != "multipart/form-data" or not boundary or _length(request) > 256:
        return False
    return request.body.strip() == f"--{boundary}--".encode()


def _length(request) -> int:
    try:
        return int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return 1


def _non_json_body(request) -> bool:
    if request.method not in BODY_METHODS or not _has_body(request) or _is_json(request.content_type or ""):
        return False
    return not _empty_form(request)


class AccessMiddleware:
    """The API key and the cross-site rules above, in front of every view."""

    def __init__(self, get_response):
        self.get_response = get_response
        self.csrf = CsrfViewMiddleware(get_response)

    def __call__(self, request):
        path = request.path
        if path.startswith(API_PREFIXES):
            refused = self.api_refusal(request, path)
        elif settings.MILLM_API_KEY and not path.startswith(OPEN_PATHS) and not session_has_key(request.session):
            refused = login_redirect(request)
        else:
            refused = None
        return refused or self.get_response(request)

    def api_refusal(self, request, path: str):
        origin = request.headers.get("Origin")
        if origin is not None and not origin_allowed(origin, request.get_host(), secure=request.is_secure()):
            return api_error(path, status=403, code="FORBIDDEN_ORIGIN",
                             message="Cross-site request refused: this Origin is not allowed (see MILLM_ALLOWED_ORIGINS).")
        if settings.MILLM_API_KEY and not path.startswith(OPEN_PATHS):
            if key_matches(presented_key(request.headers)):
                pass
            elif session_has_key(request.session):
                # A browser session rides on a cookie, so its writes need the page's CSRF token too.
                if request.method not in ("GET", "HEAD", "OPTIONS") and \
                        self.csrf.process_view(request, None, (), {}) is not None:
                    return api_error(path, status=403, code="CSRF_FAILED",
                                     message="CSRF token missing or wrong for this browser session.")
            else:
                return unauthorized(path)
        if _non_json_body(request):
            return api_error(path, status=415, code="UNSUPPORTED_MEDIA_TYPE",
                             message="Send the body as JSON with 'Content-Type: application/json'.")
        return None
