"""The management API (/api): one NinjaAPI mounting each app's router, one envelope for every answer.

Success: `{"success": true, "data": ..., "error": null}`; failure: `{"success": false, "data": null,
"error": {"code", "message", "details"}}` with the documented codes (millm_site.errors).
"""

from __future__ import annotations

import structlog
from django.core.exceptions import RequestDataTooBig
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError
from ninja.errors import ValidationError as NinjaValidationError
from redis.exceptions import RedisError

from catalog.api import router as models_router
from downloads.api import catalog_deletes_mount
from downloads.api import router as downloads_router
from millm_site.api_fallbacks import API, body_too_large
from millm_site.envelope import error_envelope
from millm_site.errors import BROKER_UNAVAILABLE_MESSAGE, InferenceUnavailable, MillmError
from millm_site.json_body import BadJsonBody, StrictJsonParser
from monitoring.capture_api import inspect_router
from monitoring.capture_api import monitoring_router as live_monitoring_router
from monitoring.history_api import router as history_router
from monitoring.system_api import router as system_router
from profiles.api import router as profiles_router
from profiles.vector_api import router as vectors_router
from steering.api import saes_router, steering_router

log = structlog.get_logger("millm.api")

api = NinjaAPI(
    title="miLLM management API",
    version="1.0",
    urls_namespace="api",
    parser=StrictJsonParser(),
    description="Models, SAEs, steering, profiles, monitoring and health. Every answer uses the envelope "
    "{success, data, error}.",
)



@api.exception_handler(MillmError)
def on_domain_error(request, exc: MillmError):
    details = exc.details or ({"field": exc.param} if exc.param else None)  # the engine names the field as param
    return api.create_response(request, error_envelope(exc.code, exc.message, details), status=exc.status)


@api.exception_handler(RedisError)
def on_broker_error(request, exc: RedisError):
    return on_domain_error(request, InferenceUnavailable(BROKER_UNAVAILABLE_MESSAGE))


@api.exception_handler(NinjaValidationError)
def on_validation_error(request, exc: NinjaValidationError):
    # Built from the error list (capped), never from str(exc): no internals leak to clients.
    problems = [
        {"field": ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "payload")), "message": err.get("msg", "")}
        for err in exc.errors[:10]
    ]
    first = problems[0] if problems else {"field": "", "message": "invalid request"}
    message = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
    return api.create_response(request, error_envelope("VALIDATION_ERROR", message, {"errors": problems}), status=422)


@api.exception_handler(AuthenticationError)
def on_auth_error(request, exc):
    return api.create_response(request, error_envelope("UNAUTHORIZED", "Missing or wrong API key"), status=401)


@api.exception_handler(HttpError)
def on_http_error(request, exc: HttpError):
    if isinstance(exc.__cause__, BadJsonBody):
        details = {"field": exc.__cause__.param} if exc.__cause__.param else None
        return api.create_response(request, error_envelope("VALIDATION_ERROR", exc.__cause__.message, details),
                                   status=400)
    code = "NOT_FOUND" if exc.status_code == 404 else "HTTP_ERROR"
    return api.create_response(request, error_envelope(code, str(exc.message)), status=exc.status_code)


@api.exception_handler(RequestDataTooBig)
def on_body_too_large(request, exc: RequestDataTooBig):
    return body_too_large(API)


@api.exception_handler(Exception)
def on_unexpected(request, exc: Exception):
    log.exception("api_unexpected_error", path=request.path)
    return api.create_response(
        request, error_envelope("INTERNAL_ERROR", "Unexpected server error; see the server log"), status=500
    )


def _mount_routers() -> None:
    api.add_router("/", downloads_router)  # first: its models/download must win over models/{name}
    catalog_deletes_mount(models_router=models_router, saes_router=saes_router)
    api.add_router("/", system_router)
    api.add_router("/", history_router)
    api.add_router("/", inspect_router)
    api.add_router("/monitoring", live_monitoring_router)
    api.add_router("/models", models_router)
    api.add_router("/profiles", profiles_router)
    api.add_router("/saes", saes_router)
    api.add_router("/steering", steering_router)
    api.add_router("/vectors", vectors_router)


_mount_routers()
