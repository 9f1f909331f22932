"""Every message between the web tier and the inference process, defined once.

The web tier sends a call to the channel `INFERENCE_CHANNEL` (or a process's own channel) and reads
the reply on its `reply_channel`. A call gets exactly one reply (`Error` on failure) except:
`generate` answers `Started`, any number of `Chunk` (tokens coalesced every ~20 ms), then `Done`
or `Error`; `cancel` gets none. Messages travel as `.model_dump()` dicts (msgpack on the channel
layer) and are validated on receipt: the inference process answers a malformed call with an
`Error`, the client refuses a malformed reply.

No Django and no torch here: both processes import this module.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from engine.rules import FeaturePositions, SteeringDirection, SteeringMode, SteeringPositions


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- the steering a request or the active state asks for ----------------------------------------


class Condition(Message):
    """A feature's activation at the same token: holds where above < f < below (engine.steering_conditions)."""

    index: int
    above: float | None = None
    below: float | None = None
    sae: str | None = None  # the attached SAE the feature belongs to; None: the default (first attached)


class SteeringFeature(Message):
    index: int
    strength: float  # raw units (the web tier converts max_activation / residual_norm first)
    sae: str | None = None  # the attached SAE the index belongs to; None: the default (first attached)
    when: Condition | None = None  # conditional: steered only on tokens where it holds


class VectorPart(Message):
    """A steering vector's direction at one decoder layer, added to that layer's output times `strength`
    (engine/control_vectors.py); the engine checks its width and layer against the model."""

    layer: int
    values: list[float]
    strength: float = 1.0
    name: str = ""  # a stored vector's name (several parts of one vector share it)


class Steering(Message):
    """Steering in raw strengths, with the label reported back (X-miLLM-Steering, history):
    "active", "profile:<name>" or "inline". The engine checks indices and bounds against the SAE."""

    features: list[SteeringFeature] = Field(default_factory=list)
    abort_when: list[Condition] = Field(default_factory=list)  # the generation stops where one holds
    vectors: list[VectorPart] = Field(default_factory=list)  # raw vectors added at their layers (no SAE needed)
    mode: SteeringMode = "additive"
    positions: SteeringPositions = "all"
    layers: list[int] = Field(default_factory=list)  # additive: also add at these layers, each at its norm
    direction: SteeringDirection = "decoder"
    max_steered_tokens: int | None = None  # steer only the first N generated tokens (engine checks 1..MAX_STEERED_TOKENS)
    until_concept: bool = False  # a row's steering stops once it writes a steered feature's concept token
    label: str = "inline"


class ReturnFeatures(Message):
    """The request's own per-token features (`return_features` on /v1); the engine checks them
    against the SAE (engine.request_features)."""

    top_k: int = 5
    positions: FeaturePositions = "all"
    features: list[int] = Field(default_factory=list)
    sae: str | None = None  # None: the default (first attached) SAE; any attached SAE by name
    after_steering: bool = False


# --- calls ---------------------------------------------------------------------------------------


class Call(Message):
    reply_channel: str | None = None
    # A management call sent to every process (the control group): each answers with `Applied`, so the
    # web tier can tell which processes applied the change.
    broadcast: bool = False


class Ping(Call):
    type: Literal["ping"] = "ping"


class LoadModel(Call):
    type: Literal["load_model"] = "load_model"
    model: str
    dtype: str | None = None  # None: the catalog's
    quantization: str | None = None


class UnloadModel(Call):
    type: Literal["unload_model"] = "unload_model"
    model: str | None = None


class AttachSae(Call):
    type: Literal["attach_sae"] = "attach_sae"
    sae: str


class DetachSae(Call):
    type: Literal["detach_sae"] = "detach_sae"
    sae: str | None = None


class SetSteering(Call):
    type: Literal["set_steering"] = "set_steering"
    steering: Steering
    sae: str | None = None  # the SAE the features index; a process pinned to another model's SAE skips it


class ConfigureMonitoring(Call):
    type: Literal["configure_monitoring"] = "configure_monitoring"
    enabled: bool | None = None
    top_k: int | None = None
    features: list[int] | None = None


class GetStatistics(Call):
    type: Literal["statistics"] = "statistics"
    top: int = Field(20, ge=1, le=100_000)
    by: str = "mean"
    sae: str | None = None  # None: the default (first attached) SAE


class ResetStatistics(Call):
    type: Literal["reset_statistics"] = "reset_statistics"


class Embed(Call):
    type: Literal["embed"] = "embed"
    model: str | None = None
    texts: list[str]


class Generate(Call):
    type: Literal["generate"] = "generate"
    request_id: str
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None  # chat messages; the engine checks roles and contents
    params: dict[str, Any] = Field(default_factory=dict)  # the engine's SamplingParams fields
    steering: Steering | None = None  # None: the active steering
    monitor: bool | None = None  # None: the monitoring settings decide
    features: ReturnFeatures | None = None  # the request's own per-token features, in `Chunk.features`
    # Set: the requester renews a lease (`Lease`) while it listens; with no renewal for this long
    # after `started` the generation is orphaned (web process gone, request given up) and cancelled.
    lease_s: float | None = None


class FeatureLogitLens(Call):
    """The tokens one feature's decoder direction promotes and suppresses (`W_dec[i] @ W_U`)."""

    type: Literal["feature_logit_lens"] = "feature_logit_lens"
    sae: str
    index: int = Field(ge=0)
    count: int = Field(10, ge=1, le=100)


class TokenDiff(Call):
    """Score a steered greedy continuation against the unsteered one, token by token (engine/token_diff.py)."""

    type: Literal["token_diff"] = "token_diff"
    sae: str  # the default SAE (refused unless attached); every attached SAE reads the changed features
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None  # chat messages, tokenized as the generation did
    steered_ids: list[int]
    unsteered_ids: list[int]
    steering: Steering  # exactly what the steered generation ran
    top_features: int = Field(10, ge=0, le=100)


class TextToScore(Message):
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    generated_ids: list[int]


class ScoreTexts(Call):
    """Fluency (mean unsteered log-probability) and mean feature activations of continuations (the sweep)."""

    type: Literal["score_texts"] = "score_texts"
    sae: str
    texts: list[TextToScore]
    features: list[int] = Field(default_factory=list)


class ExportSteering(Call):
    """The steering compiled as the process would apply it, returned as a control vector per layer."""

    type: Literal["export_steering"] = "export_steering"
    steering: Steering


class Cancel(Message):
    type: Literal["cancel"] = "cancel"
    request_id: str


class Lease(Message):
    """The requester still listens to these generations (sent to the process's own channel)."""

    type: Literal["lease"] = "lease"
    request_ids: list[str]


AnyCall = Annotated[
    Ping | LoadModel | UnloadModel | AttachSae | DetachSae | SetSteering | ConfigureMonitoring | GetStatistics
    | ResetStatistics | Embed | Generate | Cancel | FeatureLogitLens | Lease | TokenDiff | ScoreTexts
    | ExportSteering,
    Field(discriminator="type"),
]
_CALL = TypeAdapter(AnyCall)


# --- replies -------------------------------------------------------------------------------------


class MonitoringState(Message):
    enabled: bool
    top_k: int
    features: list[int]
    active: bool  # an SAE is attached, so capture runs


class Pong(Message):
    # The runtime's status grows with features (throughput samples, GPU): unknown fields pass through.
    model_config = ConfigDict(extra="allow", frozen=True)
    type: Literal["pong"] = "pong"
    pid: int
    process_id: str | None = None
    pinned_model: str | None = None  # MILLM_INFERENCE_MODEL of this process
    uptime_s: float
    loaded_model: str | None = None
    attached_sae: str | None = None  # the default (first attached) SAE
    attached_saes: list[dict[str, Any]] = Field(default_factory=list)  # every attached SAE: name, layer, d_sae
    steering: str = "none"
    queue_depth: int = 0
    active_requests: int = 0
    tokens_per_second: float = 0.0
    requests_total: int = 0
    tokens_total: int = 0
    memory_bytes: int = 0
    monitoring: MonitoringState
    gpu: dict[str, Any] | None = None


class Loaded(Message):
    type: Literal["loaded"] = "loaded"
    model: str
    memory_bytes: int


class Unloaded(Message):
    type: Literal["unloaded"] = "unloaded"
    model: str | None


class Attached(Message):
    type: Literal["attached"] = "attached"
    sae: str


class Detached(Message):
    type: Literal["detached"] = "detached"
    sae: str | None


class SteeringSet(Message):
    type: Literal["steering_set"] = "steering_set"
    label: str


class MonitoringSettings(MonitoringState):
    type: Literal["monitoring"] = "monitoring"


class FeatureStatistic(Message):
    model_config = ConfigDict(extra="allow", frozen=True)  # more metric columns may follow
    index: int
    value: float | None  # the ranking metric; None for a never-seen feature's ±inf
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    active_ratio: float | None


class Statistics(Message):
    type: Literal["statistics"] = "statistics"
    total_tokens: int
    by: str
    top: list[FeatureStatistic]
    sae: str | None = None  # the SAE these statistics are of


class StatisticsReset(Message):
    type: Literal["statistics_reset"] = "statistics_reset"


class Embeddings(Message):
    type: Literal["embeddings"] = "embeddings"
    vectors: list[list[float]]
    prompt_tokens: int


class TokenLogit(Message):
    token_id: int
    text: str
    logit: float


class FeatureLogits(Message):
    type: Literal["feature_logits"] = "feature_logits"
    sae: str
    index: int
    promoted: list[TokenLogit]
    suppressed: list[TokenLogit]


class TokenDiffToken(Message):
    token_id: int
    token: str
    position: int
    steered_logprob: float
    unsteered_logprob: float
    kl: float


class FeatureChange(Message):
    index: int
    before: float
    after: float
    delta: float
    sae: str | None = None  # the attached SAE whose feature this is
    relative_delta: float | None = None  # delta / that SAE's typical firing activation (orders SAEs' changes of one rank)


class TokenDiffResult(Message):
    type: Literal["token_diff_result"] = "token_diff_result"
    tokens: list[TokenDiffToken]
    first_divergence: int | None
    top_changed_features: list[FeatureChange]
    saes: list[str] = Field(default_factory=list)  # the SAEs the features were read from, in attach order


class TextScore(Message):
    tokens: int
    mean_logprob: float | None  # None for an empty continuation
    feature_means: list[float]  # per requested feature, its mean activation over the generated tokens


class TextScores(Message):
    type: Literal["text_scores"] = "text_scores"
    scores: list[TextScore]


class SteeringExported(Message):
    type: Literal["steering_exported"] = "steering_exported"
    model_hint: str  # the model's type (config.model_type), llama.cpp's controlvector.model_hint
    parts: list[VectorPart]  # one per layer, strength 1


class Started(Message):
    type: Literal["started"] = "started"
    worker_channel: str  # the generating process's own channel: cancel and liveness pings go there
    request_id: str
    prompt_tokens: int
    steering: str  # the label of the steering applied
    prompt_text: str


class TopLogprob(Message):
    text: str
    logprob: float


class Token(Message):
    id: int
    text: str
    logprob: float | None = None  # only when the request asked for logprobs
    top_logprobs: list[TopLogprob] | None = None


class Chunk(Message):
    type: Literal["chunk"] = "chunk"
    text: str  # every token's text since the last chunk
    tokens: list[Token]
    frames: list[dict[str, Any]] | None = None  # per-token features (engine.activation_frames), when monitored
    # The request's own features (return_features): {"sae": name, "tokens": [frame, ...]}, cut to what it asked
    features: dict[str, Any] | None = None


class Usage(Message):
    prompt_tokens: int
    completion_tokens: int


class Timings(Message):
    queued_s: float | None = None
    first_token_s: float | None = None
    total_s: float | None = None


class Done(Message):
    type: Literal["done"] = "done"
    finish_reason: str
    steering: str
    abort: dict[str, Any] | None = None  # finish_reason "content_filter": {index, value, position, token}
    usage: Usage
    timings: Timings


class Error(Message):
    """A refused or failed call: the code and status from engine.errors' table, the offending param."""

    type: Literal["error"] = "error"
    code: str
    status: int
    message: str
    param: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class Skipped(Message):
    """A broadcast call that does not concern this process (it is pinned to another model)."""

    type: Literal["skipped"] = "skipped"
    reason: str


class Received(Message):
    """Sent at once by each process that got a broadcast call, before it runs it: the web tier then
    waits (up to the call's timeout) only for processes that are really alive."""

    type: Literal["received"] = "received"
    process_id: str


class Applied(Message):
    """One process's answer to a broadcast call: who it is, and the call's own reply (or `Skipped`)."""

    type: Literal["applied"] = "applied"
    process_id: str
    reply: dict[str, Any]


AnyReply = Annotated[
    Pong | Loaded | Unloaded | Attached | Detached | SteeringSet | MonitoringSettings | Statistics | StatisticsReset
    | Embeddings | Started | Chunk | Done | Error | Skipped | Received | Applied | FeatureLogits
    | TokenDiffResult | TextScores | SteeringExported,
    Field(discriminator="type"),
]
_REPLY = TypeAdapter(AnyReply)


def control_group(channel: str) -> str:
    """The group every inference process on `channel` joins: broadcast management calls go there."""
    return f"{channel}.control"


def parse_call(message: dict[str, Any]) -> AnyCall:
    """A received call, validated; raises pydantic's ValidationError."""
    return _CALL.validate_python(message)


def parse_reply(message: dict[str, Any]) -> AnyReply:
    return _REPLY.validate_python(message)


def validation_problem(exc: ValidationError) -> tuple[str, str | None]:
    """(message, param) from the first problem of a validation error: short, no input values echoed."""
    first = exc.errors(include_url=False, include_input=False)[0]
    loc = first.get("loc", ())[1:]  # the first element is the call's type (the union's tag)
    param = ".".join(str(p) for p in loc) or None
    return (f"{param}: {first['msg']}" if param else first["msg"]), param
