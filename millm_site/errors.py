"""Domain errors with the documented codes. /api turns them into its envelope (one handler in
millm_site/api.py), /v1 into OpenAI's error shape (one function in serving/completions.py).

Each class names its code; the status comes from the one code → status table in engine/errors.py,
which the engine's own errors use too, so an error crossing the process boundary keeps both.
"""

from __future__ import annotations

from typing import Any

from engine.errors import status_for

_BY_CODE: dict[str, type[MillmError]] = {}


class MillmError(Exception):
    code = "INTERNAL_ERROR"
    status = 500

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.status = status_for(cls.code, cls.status)
        _BY_CODE.setdefault(cls.code, cls)  # the most general class with a code answers for it

    def __init__(self, message: str, *, details: dict[str, Any] | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.param = param  # the offending request field, when one is to blame


def error_for_code(code: str, message: str, *, status: int | None = None, param: str | None = None,
                   details: dict[str, Any] | None = None) -> MillmError:
    """The MillmError for a code (an inference process's `error` reply): its class when there is one."""
    error = _BY_CODE.get(code, MillmError)(message, details=details, param=param)
    if type(error) is MillmError:  # a code without a class of its own (CONTEXT_LENGTH_EXCEEDED, ...)
        error.code = code
    error.status = status or status_for(code, error.status)
    return error


class NotFound(MillmError):
    code = "NOT_FOUND"


class ModelNotFound(NotFound):
    code = "MODEL_NOT_FOUND"


class SaeNotFound(NotFound):
    code = "SAE_NOT_FOUND"


class ProfileNotFound(NotFound):
    code = "PROFILE_NOT_FOUND"


class ModelNotLoaded(MillmError):
    code = "MODEL_NOT_LOADED"


class SaeNotAttached(MillmError):
    code = "SAE_NOT_ATTACHED"


class InvalidFeatureIndex(MillmError):
    code = "INVALID_FEATURE_INDEX"


class ValidationFailed(MillmError):
    code = "VALIDATION_ERROR"


class Conflict(MillmError):
    code = "CONFLICT"


class DownloadFailed(MillmError):
    code = "DOWNLOAD_FAILED"


class InferenceUnavailable(MillmError):
    code = "INFERENCE_UNAVAILABLE"


class InvalidRequest(MillmError):
    """A request the engine cannot run as asked (OpenAI's invalid_value); `param` names the field."""

    code = "INVALID_VALUE"


# While Redis (channel layer, broker) is away or restarting, Redis calls raise redis' RedisError;
# each API maps it to its 503 with this message, so a restart is a clean refusal, never a 500.
BROKER_UNAVAILABLE_MESSAGE = "The message broker (Redis) is unreachable; retry in a few seconds"
