"""Inspect a text: run it through the model once (no generation kept) and read each token's top features.

Shared by `/api/inspect` and the Steering page's "top features for this text".
"""

from __future__ import annotations

from inference import generation_stream
from inference.client import inference_client
from inference.messages import Steering
from millm_site.errors import ModelNotLoaded, SaeNotAttached
from monitoring.live import activation_publisher
from monitoring.request_tracking import RequestTracker


async def text_inspect(*, text: str, model: str | None = None) -> dict:
    """`{model, sae, tokens}`: one frame per prompt token (`position`, `token`, `features` {index: value})."""
    pong = await inference_client().ping()
    model = model or pong.loaded_model
    if model is None:
        raise ModelNotLoaded("No model is loaded")
    if not pong.attached_sae:
        raise SaeNotAttached("No SAE is attached: attach one to see its features")
    result = await generation_stream.collect(generation_stream.generate(
        model=model, prompt=text, messages=None, params={"max_tokens": 1, "temperature": 0.0},
        steering=Steering(), monitor=True, observer=RequestTracker(endpoint="inspect", model=model),
        on_frames=activation_publisher().offer))
    # Several SAEs attached: every token has a frame per SAE; inspect answers the default SAE's (`sae`).
    tokens = [f for f in result.frames if f["type"] == "prompt" and f.get("sae", pong.attached_sae) == pong.attached_sae]
    return {"model": model, "sae": pong.attached_sae, "tokens": tokens}
