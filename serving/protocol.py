"""OpenAI protocol models for /v1: requests (validated) and the response bodies (spec-conformant).

Only the protocol lives here; resolving models and profiles and talking to the inference process
is `serving/completions.py`. Unsupported features are refused with a 400 naming the param,
never silently ignored (a client asking for tools must not get a tool-less answer).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from engine.rules import (
    LOGIT_BIAS_LIMIT,
    MAX_FEATURE_INDEX,
    MAX_RETURN_FEATURES,
    MAX_RETURN_TOP_K,
    MAX_STEERED_TOKENS,
    MAX_STEERING_LAYERS,
    MAX_STOP_SEQUENCES,
    MAX_TOP_LOGPROBS,
    FeaturePositions,
    SteeringDirection,
    SteeringMode,
    SteeringPositions,
    StrengthUnit,
)

# Integers are strict (OpenAI's spec says integer: "4" is refused, not coerced) and bounded, so
# nothing past 64 bits ever reaches the msgpack transport to the inference process.
MAX_TOKENS_LIMIT = 1 << 20  # far past any context length; the engine refuses what does not fit
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 63) - 1  # int64, as in OpenAI's spec
MAX_TOKEN_ID = (1 << 31) - 1  # the engine checks the loaded vocabulary
MAX_LOGIT_BIAS_ENTRIES = 1024
TokenCount = Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_LIMIT)]
MAX_VECTOR_WIDTH, MAX_VECTOR_LAYER = 1 << 16, 1023  # past any hidden size and depth; the model's own are checked


class OpenAIRequestError(Exception):
    """A request the OpenAI way: status + type + param + code."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = "invalid_value",
                 status: int = 400, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ConditionIn(BaseModel):
    """A feature's activation at the same token (raw activation units): holds where above < f < below."""

    model_config = ConfigDict(extra="forbid")
    index: StrictInt = Field(ge=0, le=MAX_FEATURE_INDEX)
    sae: str | None = Field(default=None, min_length=1, max_length=120)  # an attached SAE; None: the default
    above: float | None = Field(default=None, allow_inf_nan=False)
    below: float | None = Field(default=None, allow_inf_nan=False)

    @model_validator(mode="after")
    def _has_a_bound(self) -> ConditionIn:
        if self.above is None and self.below is None:
            raise ValueError("a condition needs `above` or `below`")
        return self


class SteeringFeatureIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: StrictInt = Field(ge=0, le=MAX_TOKEN_ID)
    strength: float | None = Field(default=None, allow_inf_nan=False)  # None: the feature's calibrated strength
    sae: str | None = Field(default=None, min_length=1, max_length=120)  # an attached SAE; None: the default
    when: ConditionIn | None = None  # steer only on tokens where this holds (additive mode)


class VectorIn(BaseModel):
    """A steering vector added at a decoder layer's output: a stored one by `name`, or `layer` + `vector`."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, min_length=1, max_length=100)
    layer: StrictInt | None = Field(default=None, ge=0, le=MAX_VECTOR_LAYER)
    vector: list[Annotated[float, Field(allow_inf_nan=False)]] | None = Field(default=None, min_length=1,
                                                                               max_length=MAX_VECTOR_WIDTH)
    strength: float = Field(default=1.0, allow_inf_nan=False)


class InlineSteering(BaseModel):
    """miLLM extension: steer this request only (`steering` in the body)."""

    model_config = ConfigDict(extra="forbid")
    features: list[SteeringFeatureIn] = Field(default_factory=list, max_length=256)
    vectors: list[VectorIn] = Field(default_factory=list, max_length=16)  # raw or stored vectors at their layers
    abort_when: list[ConditionIn] = Field(default_factory=list, max_length=64)  # stop where one holds
    mode: SteeringMode = "additive"
    positions: SteeringPositions = "all"
    units: StrengthUnit = "raw"
    layers: list[StrictInt] = Field(default_factory=list, max_length=MAX_STEERING_LAYERS)
    direction: SteeringDirection = "decoder"
    max_steered_tokens: StrictInt | None = Field(default=None, ge=1, le=MAX_STEERED_TOKENS)  # the first N tokens only
    until_concept: StrictBool = False  # stop once a steered feature's concept token is written
    preset: Literal["recommended"] | None = None  # the SAE's measured setting replaces the seven above


class ReturnFeaturesIn(BaseModel):
    """miLLM extension: this request's per-token SAE features (`return_features` in the body), returned
    under `millm_features` (per chunk when streaming). Read before steering unless `after_steering`."""

    model_config = ConfigDict(extra="forbid")
    top_k: StrictInt = Field(default=5, ge=0, le=MAX_RETURN_TOP_K)
    positions: FeaturePositions = "all"
    features: list[Annotated[StrictInt, Field(ge=0, le=MAX_FEATURE_INDEX)]] = Field(
        default_factory=list, max_length=MAX_RETURN_FEATURES)
    sae: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    after_steering: bool = False

    @model_validator(mode="after")
    def _asks_for_something(self) -> ReturnFeaturesIn:
        if self.top_k == 0 and not self.features:
            raise ValueError("return_features asks for nothing: give top_k > 0 or features")
        return self


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields (user, metadata, …) are harmless

    model: Annotated[str, Field(min_length=1, max_length=200)]
    max_tokens: TokenCount | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: Annotated[StrictInt, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(default=1, ge=1, le=128)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(allow_inf_nan=False)]] | None = Field(
        default=None, max_length=MAX_LOGIT_BIAS_ENTRIES)
    steering: InlineSteering | None = None
    return_features: ReturnFeaturesIn | None = None
    ignore_eos: bool = False  # miLLM extension for benchmarks: generate exactly max_tokens

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value: dict[str, float] | None) -> list[list[int | float]]:
        # Pairs, not a map: msgpack refuses integer map keys on the way to the inference process.
        pairs = []
        for key, bias in (value or {}).items():
            if not key.isascii() or not key.isdigit() or int(key) > MAX_TOKEN_ID:
                raise ValueError(f"keys must be token ids (0..{MAX_TOKEN_ID}); got {key[:20]!r}")
            pairs.append([int(key), max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, bias))])
        return pairs

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise OpenAIRequestError("n > 1 is not supported; send n separate requests", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise OpenAIRequestError(f"{name} is not supported (use 0)", param=name)
        if self.stream_options is not None and not self.stream:
            raise OpenAIRequestError("stream_options is only allowed with stream: true", param="stream_options")

    def sampling_params(self, *, max_tokens: int | None, logprobs: bool, top_logprobs: int) -> dict[str, Any]:
        return {"max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                "stop": self.stop, "logprobs": logprobs, "top_logprobs": top_logprobs, "ignore_eos": self.ignore_eos,
                "logit_bias": self.logit_bias or None}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise OpenAIRequestError("only text content parts are supported", param="messages")
                parts.append(part["text"])
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: TokenCount | None = None
    logprobs: bool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise OpenAIRequestError("tools are not supported by miLLM", param="tools")
        if self.tool_choice not in (None, "none"):
            raise OpenAIRequestError("tool_choice is not supported by miLLM", param="tool_choice")
        if self.response_format and self.response_format.get("type") != "text":
            raise OpenAIRequestError("only response_format {type: text} is supported", param="response_format")
        if any(m.role == "tool" for m in self.messages):
            raise OpenAIRequestError("tool messages are not supported", param="messages")

    def chat_messages(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def params(self) -> dict[str, Any]:
        return self.sampling_params(max_tokens=self.max_completion_tokens or self.max_tokens,
                                    logprobs=self.logprobs, top_logprobs=self.top_logprobs or 0)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    max_tokens: TokenCount | None = 16  # OpenAI's default for /v1/completions
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[StrictInt, Field(ge=1, le=128)] | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("exactly one prompt per request is supported")
            value = value[0]
        if value == "":
            raise ValueError("prompt must not be empty")
        return value

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise OpenAIRequestError("echo is not supported", param="echo")
        if self.suffix:
            raise OpenAIRequestError("suffix is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise OpenAIRequestError("best_of > 1 is not supported", param="best_of")

    def params(self) -> dict[str, Any]:
        wants = self.logprobs is not None
        return self.sampling_params(max_tokens=self.max_tokens, logprobs=wants, top_logprobs=self.logprobs or 0)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Annotated[str, Field(min_length=1)]
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[StrictInt, Field(ge=1, le=1 << 20)] | None = None

    @field_validator("input")
    @classmethod
    def _texts(cls, value: str | list[str]) -> list[str]:
        texts = [value] if isinstance(value, str) else value
        if any(t == "" for t in texts):
            raise ValueError("input must not contain empty strings")
        if len(texts) > 256:
            raise ValueError("at most 256 inputs per request")
        return texts


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(name: str, created: int, owned_by: str = "millm") -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": owned_by}
