"""/v1: the OpenAI-compatible API. Thin endpoints over serving.completions; OpenAI error shapes.

Every answer carries `X-miLLM-Steering` (none, active, profile:<name>, inline) saying which steering
the model ran with.
"""

from __future__ import annotations

import base64
import struct

import structlog
from asgiref.sync import sync_to_async
from django.core.exceptions import RequestDataTooBig
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from ninja import NinjaAPI
from ninja.errors import HttpError
from ninja.errors import ValidationError as NinjaValidationError
from redis.exceptions import RedisError

from catalog.models import LanguageModel
from inference import registry
from inference.client import inference_client
from millm_site.api_fallbacks import V1, body_too_large
from millm_site.errors import BROKER_UNAVAILABLE_MESSAGE, MillmError
from millm_site.json_body import BadJsonBody, StrictJsonParser
from profiles.models import Profile
from serving import completions as openai_serving
from serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    OpenAIRequestError,
    model_card,
)

log = structlog.get_logger("millm.v1")

v1 = NinjaAPI(title="miLLM OpenAI-compatible API", version="1.0", urls_namespace="v1", parser=StrictJsonParser(),
              description="OpenAI's /v1 models, completions, chat completions and embeddings, served by the "
              "steered model. Extra body field `steering: {features: [{index, strength}], mode, positions}`; "
              "`model` may name a profile as `<model>:<profile>`.")


def error_response(exc: OpenAIRequestError) -> JsonResponse:
    return JsonResponse(exc.body(), status=exc.status)


@v1.exception_handler(OpenAIRequestError)
def on_openai_error(request, exc: OpenAIRequestError):
    return error_response(exc)


@v1.exception_handler(NinjaValidationError)
def on_validation_error(request, exc: NinjaValidationError):
    first = exc.errors[0] if exc.errors else {}
    location = [str(p) for p in first.get("loc", ()) if p not in ("body", "payload")]
    param = ".".join(location) or None
    message = first.get("msg", "Invalid request")
    return error_response(OpenAIRequestError(f"{param}: {message}" if param else message, param=param))


@v1.exception_handler(HttpError)
def on_http_error(request, exc: HttpError):
    if isinstance(exc.__cause__, BadJsonBody):
        return error_response(OpenAIRequestError(exc.__cause__.message, param=exc.__cause__.param))
    message = "Request body is not valid JSON" if exc.status_code == 400 else str(exc.message)
    return error_response(OpenAIRequestError(message, code=None, status=exc.status_code))


@v1.exception_handler(RequestDataTooBig)
def on_body_too_large(request, exc: RequestDataTooBig):
    return body_too_large(V1)


@v1.exception_handler(MillmError)
def on_domain_error(request, exc: MillmError):
    return error_response(openai_serving.openai_error(exc))


@v1.exception_handler(RedisError)
def on_broker_error(request, exc: RedisError):
    return error_response(OpenAIRequestError(BROKER_UNAVAILABLE_MESSAGE, code="service_unavailable", status=503,
                                             type="server_error"))


@v1.exception_handler(Exception)
def on_unexpected(request, exc: Exception):
    log.exception("v1_unexpected_error", path=request.path)
    return error_response(OpenAIRequestError("Unexpected server error; see the server log", code=None, status=500,
                                             type="server_error"))


def base64_floats(vector: list[float]) -> str:
    """OpenAI's base64 embedding: little-endian float32, what the official clients decode."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def _respond(body, headers: dict[str, str]) -> HttpResponse:
    if isinstance(body, dict):
        response: HttpResponse = JsonResponse(body)
    else:
        response = StreamingHttpResponse(body, content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
    for name, value in headers.items():
        response[name] = value
    return response


def model_cards(served: set[str] | None = None) -> list[dict]:
    """The models (and their profile aliases) clients can use: those the inference processes serve, or,
    while no process is on record (none started yet), the whole catalog."""
    data = []
    profiles = list(Profile.objects.select_related("model"))
    models = LanguageModel.objects.all()
    if served is not None:
        models = models.filter(name__in=served)
    for model in models:
        created = int(model.created_at.timestamp())
        data.append(model_card(model.name, created))
        data += [model_card(f"{model.name}:{p.name}", int(p.created_at.timestamp()))
                 for p in profiles if p.model_id in (None, model.pk)]
    return data


@v1.get("/models", summary="List the models (and <model>:<profile> aliases)")
async def list_models(request):
    return JsonResponse({"object": "list", "data": await sync_to_async(model_cards)(await registry.models_served())})


@v1.get("/models/{model_id}", summary="One model (or <model>:<profile> alias), as in the list")
async def retrieve_model(request, model_id: str):
    cards = await sync_to_async(model_cards)(await registry.models_served())
    card = next((c for c in cards if c["id"] == model_id), None)
    if card is None:
        raise OpenAIRequestError(f"The model {model_id[:200]!r} does not exist", param="model",
                                 code="model_not_found", status=404)
    return JsonResponse(card)


@v1.post("/chat/completions", summary="Chat completion (SSE when stream: true)")
async def chat_completions(request, payload: ChatCompletionRequest):
    body, headers = await openai_serving.chat_completion(payload)
    return _respond(body, headers)


@v1.post("/completions", summary="Text completion (SSE when stream: true)")
async def completions(request, payload: CompletionRequest):
    body, headers = await openai_serving.text_completion(payload)
    return _respond(body, headers)


@v1.post("/embeddings", summary="Embeddings from the loaded model's hidden states")
async def embeddings(request, payload: EmbeddingRequest):
    target = await openai_serving.resolve_target(payload.model)
    if payload.dimensions is not None:
        raise OpenAIRequestError("dimensions is not supported", param="dimensions")
    reply = await inference_client().embed(model=target.model.name, texts=payload.input)
    encode = base64_floats if payload.encoding_format == "base64" else list
    data = [{"object": "embedding", "index": i, "embedding": encode(vector)} for i, vector in enumerate(reply.vectors)]
    usage = {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens}
    return _respond({"object": "list", "data": data, "model": payload.model, "usage": usage}, {"X-miLLM-Steering": "none"})
