"""Domain errors with the management API's documented codes; endpoints turn them into envelopes."""

from __future__ import annotations

from typing import Any


class MillmError(Exception):
    code = "INTERNAL_ERROR"
    status = 500

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class NotFound(MillmError):
    code = "NOT_FOUND"
    status = 404


class ModelNotFound(NotFound):
    code = "MODEL_NOT_FOUND"


class SaeNotFound(NotFound):
    code = "SAE_NOT_FOUND"


class ProfileNotFound(NotFound):
    code = "PROFILE_NOT_FOUND"


class ModelNotLoaded(MillmError):
    code = "MODEL_NOT_LOADED"
    status = 400


class SaeNotAttached(MillmError):
    code = "SAE_NOT_ATTACHED"
    status = 400


class InvalidFeatureIndex(MillmError):
    code = "INVALID_FEATURE_INDEX"
    status = 400


class ValidationFailed(MillmError):
    code = "VALIDATION_ERROR"
    status = 422


class Conflict(MillmError):
    code = "CONFLICT"
    status = 409


class InsufficientMemory(MillmError):
    code = "INSUFFICIENT_MEMORY"
    status = 507


class DownloadFailed(MillmError):
    code = "DOWNLOAD_FAILED"
    status = 502


class InferenceUnavailable(MillmError):
    code = "INFERENCE_UNAVAILABLE"
    status = 503
