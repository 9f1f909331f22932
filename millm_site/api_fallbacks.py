"""Answers the API frameworks would otherwise give as HTML or plain text, in each API's own shape:
an unknown path (404), a known path with the wrong method (405), a body over the size limit (413).

`/v1` answers OpenAI's `{"error": {message, type, param, code}}`, `/api` the envelope.
"""

from __future__ import annotations

from collections.abc import Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from millm_site.envelope import error_envelope

V1, API = "v1", "api"


def error_response(shape: str, *, status: int, message: str, code: str, param: str | None = None) -> JsonResponse:
    if shape == V1:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        body = {"error": {"message": message, "type": kind, "param": param, "code": code.lower()}}
    else:
        body = error_envelope(code.upper(), message, {"field": param} if param else None)
    return JsonResponse(body, status=status)


def body_too_large(shape: str) -> JsonResponse:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return error_response(shape, status=413, code="request_too_large",
                          message=f"Request body is larger than the {limit} byte limit ({limit / 2**20:.1f} MiB)")


def not_found_view(shape: str) -> Callable:
    @csrf_exempt
    def not_found(request, *args, **kwargs) -> JsonResponse:
        # The path is not echoed back: it is the client's input, and may be long.
        return error_response(shape, status=404, code="not_found",
                              message=f"No such endpoint under /{shape}/; see /{shape}/docs")

    return not_found


def _method_not_allowed(shape: str, response: HttpResponse, request) -> HttpResponse:
    if response.status_code != 405 or response.get("Content-Type", "").startswith("application/json"):
        return response
    allowed = response.get("Allow", "")
    answer = error_response(shape, status=405, code="method_not_allowed",
                            message=f"Method {request.method[:10]} is not allowed here; allowed: {allowed}")
    answer["Allow"] = allowed
    return answer


def _wrap(view: Callable, shape: str) -> Callable:
    if iscoroutinefunction(view):
        async def wrapped(request, *args, **kwargs):
            return _method_not_allowed(shape, await view(request, *args, **kwargs), request)

        markcoroutinefunction(wrapped)
    else:
        def wrapped(request, *args, **kwargs):
            return _method_not_allowed(shape, view(request, *args, **kwargs), request)

    wrapped.csrf_exempt = getattr(view, "csrf_exempt", False)  # ninja's views skip Django's CSRF check
    return wrapped


def json_method_errors(urls: tuple, shape: str) -> tuple:
    """A NinjaAPI's `urls` with each view's plain-text 405 answered in the API's JSON shape instead."""
    patterns, app_name, namespace = urls
    for pattern in patterns:
        if getattr(pattern, "callback", None) is not None:
            pattern.callback = _wrap(pattern.callback, shape)
    return patterns, app_name, namespace
