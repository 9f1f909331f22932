"""Conditional steering and abort through /v1 on the live stack (test tier): a condition that never holds
changes nothing, one that always holds equals plain steering, abort stops at the position computed from
the request's own returned features, bad conditions get a clear 400 and nothing runs."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.live.conftest import load_tiny
from tests.live.test_openai_conformance import assert_conforms

SAE = "tiny-llama-layer_2"
CAT = 7
PROMPT = "The dog sat on the"
TOWARD_CAT = {"index": CAT, "strength": 2.0}


@pytest.fixture(scope="module")
def url(live_stack):
    load_tiny(live_stack)
    response = httpx.post(f"{live_stack.url}/api/saes/{SAE}/attach", timeout=300)
    assert response.status_code == 200, response.text
    return live_stack.url


def complete(url, steering=None, **extra) -> httpx.Response:
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 10, "temperature": 0, **extra}
    if steering is not None:
        body["steering"] = {"units": "residual_norm", **steering}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_a_condition_gates_the_feature(url):
    plain = text(complete(url))
    steered = text(complete(url, {"features": [TOWARD_CAT]}))
    assert steered != plain
    never = {**TOWARD_CAT, "when": {"index": CAT, "above": 1e6}}
    always = {**TOWARD_CAT, "when": {"index": CAT, "below": 1e6}}
    assert text(complete(url, {"features": [never]})) == plain
    assert text(complete(url, {"features": [always]})) == steered


def test_abort_stops_at_the_computed_position_and_reports_it(url):
    free = complete(url, {"features": [TOWARD_CAT]}, return_features={"top_k": 0, "features": [CAT],
                                                                        "positions": "generated"})
    body = free.json()
    values = [(f["position"], f["features"][str(CAT)]) for f in body["millm_features"]["tokens"]]
    threshold = max(v for _, v in values) / 2
    assert threshold > 0
    position = next(p for p, v in values if v > threshold)
    prompt_tokens = body["usage"]["prompt_tokens"]
    aborted = complete(url, {"features": [TOWARD_CAT], "abort_when": [{"index": CAT, "above": threshold}]})
    assert aborted.status_code == 200, aborted.text
    result = aborted.json()
    assert_conforms(result, "CreateCompletionResponse")
    assert result["choices"][0]["finish_reason"] == "content_filter"
    abort = result["millm_abort"]
    assert (abort["index"], abort["position"]) == (CAT, position)
    assert abort["value"] == pytest.approx(dict(values)[position], abs=1e-3)
    assert result["usage"]["completion_tokens"] == position - prompt_tokens + 1
    assert body["choices"][0]["text"].startswith(result["choices"][0]["text"])
    assert aborted.headers["x-millm-abort"] == f"index={CAT}; value={abort['value']}; position={position}"

    stream_body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stream": True,
                   "steering": {"units": "residual_norm", "features": [TOWARD_CAT],
                                "abort_when": [{"index": CAT, "above": threshold}]}}
    with httpx.stream("POST", f"{url}/v1/completions", json=stream_body, timeout=60) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    assert_conforms(chunks[-1], "CreateCompletionResponse")  # text chunks carry finish_reason null, as OpenAI's do
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert chunks[-1]["millm_abort"] == abort


@pytest.mark.parametrize("steering,param,code", [
    ({"abort_when": [{"index": CAT, "above": float("nan")}]}, "steering.abort_when.0.above", "invalid_value"),
    ({"abort_when": [{"index": CAT}]}, "steering.abort_when.0", "invalid_value"),
    ({"abort_when": [{"index": 1 << 20, "above": 1.0}]}, None, "invalid_feature_index"),
    ({"features": [{"index": CAT, "strength": 1.0, "when": {"index": 1 << 20, "above": 1}}]}, None,
     "invalid_feature_index"),
    ({"mode": "clamp", "features": [{"index": CAT, "strength": 1.0, "when": {"index": 3, "above": 1}}]}, None,
     "validation_error"),
])
def test_bad_conditions_get_a_clear_4xx(url, steering, param, code):
    response = httpx.post(f"{url}/v1/completions", timeout=60, content=json.dumps(
        {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 2, "steering": steering}),
        headers={"content-type": "application/json"})
    assert response.status_code == (422 if code == "validation_error" else 400), response.text  # errors.py's table
    error = response.json()["error"]
    assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error


def test_a_condition_with_no_sae_attached_is_refused(url):
    assert httpx.post(f"{url}/api/saes/{SAE}/detach", timeout=120).status_code == 200
    try:
        response = complete(url, {"abort_when": [{"index": CAT, "above": 1.0}]})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "sae_not_attached"
    finally:
        assert httpx.post(f"{url}/api/saes/{SAE}/attach", timeout=300).status_code == 200
