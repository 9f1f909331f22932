"""The engine's errors: one hierarchy, each error carrying its API code, HTTP status and the
offending parameter, so the inference process forwards them as they are and the web tier maps a
code to a status with the one table below (`millm_site/errors.py` derives its classes from it).

No torch and no Django here: both sides of the process boundary import this module.
"""

from __future__ import annotations

# Every error code the APIs document, with its HTTP status. /api shows the code as is, /v1 in lower case.
STATUS_BY_CODE: dict[str, int] = {
    "INVALID_VALUE": 400,  # a request the engine cannot run as asked (OpenAI's invalid_value)
    "CONTEXT_LENGTH_EXCEEDED": 400,
    "CHAT_TEMPLATE_MISSING": 400,
    "MODEL_NOT_LOADED": 400,
    "SAE_NOT_ATTACHED": 400,
    "INVALID_FEATURE_INDEX": 400,
    "UNAUTHORIZED": 401,
    "NOT_FOUND": 404,
    "MODEL_NOT_FOUND": 404,
    "SAE_NOT_FOUND": 404,
    "PROFILE_NOT_FOUND": 404,
    "CONFLICT": 409,
    "VALIDATION_ERROR": 422,
    "INTERNAL_ERROR": 500,
    "DOWNLOAD_FAILED": 502,
    "INFERENCE_UNAVAILABLE": 503,
    "INSUFFICIENT_MEMORY": 507,
}


def status_for(code: str, default: int = 400) -> int:
    return STATUS_BY_CODE.get(code, default)


class EngineError(Exception):
    """Base of every error the engine raises on purpose: `code` (upper case), `status`, `param`, `message`."""

    code = "INTERNAL_ERROR"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = (code or type(self).code).upper()
        self.status = status_for(self.code, status_for(type(self).code))
        self.param = param


class InvalidRequestError(EngineError, ValueError):
    """A request the engine cannot run as asked; `param` names the offending OpenAI field."""

    code = "INVALID_VALUE"

    def __init__(self, *, param: str | None, message: str, code: str | None = None) -> None:
        super().__init__(message, code=code, param=param)


class ModelNotLoadedError(EngineError):
    code = "MODEL_NOT_LOADED"


class SaeNotAttachedError(EngineError, RuntimeError):
    """An operation that needs an attached SAE, with none attached."""

    code = "SAE_NOT_ATTACHED"


class ModelLoadError(EngineError):
    """Base class of the loading errors."""

    code = "VALIDATION_ERROR"


class ModelNotFoundError(ModelLoadError):
    """The folder or GGUF file does not exist."""

    code = "MODEL_NOT_FOUND"


class UnsupportedConfigurationError(ModelLoadError):
    """An impossible combination of options (unknown dtype, quantizing a GGUF file, ...)."""


class QuantizationUnavailableError(ModelLoadError):
    """Q4/Q8 asked for where bitsandbytes is missing or has no backend for this device."""


class InvalidModelError(ModelLoadError):
    """The folder exists but holds no loadable causal LM or tokenizer."""


class InsufficientMemoryError(ModelLoadError):
    """The weights (model or SAE) do not fit in the device's memory."""

    code = "INSUFFICIENT_MEMORY"


class UnsupportedModelError(ModelLoadError):
    """The model loads but cannot be served (e.g. its cache cannot be batched)."""


class SaeError(EngineError):
    """Base class of the SAE errors."""

    code = "VALIDATION_ERROR"


class UnsupportedSaeError(SaeError):
    """The SAE's architecture or configuration is not one the engine can run."""


class SaeIncompatibleError(SaeError):
    """The SAE does not fit the loaded model (hidden size, layer count, hook point)."""


class InvalidSteeringError(EngineError, ValueError):
    """A steering request that cannot be applied (bad mode, positions, strength, duplicates)."""

    code = "VALIDATION_ERROR"


class InvalidFeatureIndexError(InvalidSteeringError):
    """A steered or monitored feature index outside [0, d_sae)."""

    code = "INVALID_FEATURE_INDEX"


class SchedulerUnavailableError(EngineError, RuntimeError):
    """The scheduler is stopped or its queue is full."""

    code = "INFERENCE_UNAVAILABLE"


class GenerationFailedError(EngineError):
    """A generation that broke while running (the scheduler finished it with reason "error")."""

    code = "INTERNAL_ERROR"
