"""Features returned per request (engine side): each row's frames equal the SAE's encoding of its own
residual, computed by hand from a plain forward pass, before or after steering, cut to its own top-k,
features and positions, while the monitoring frames of other rows keep their own settings."""

from __future__ import annotations

import pytest
import torch

from engine.errors import InvalidFeatureIndexError, InvalidRequestError, SaeNotAttachedError
from engine.generation import FinishEvent, TokenEvent
from engine.request_features import FeatureRequest
from engine.runtime import EngineRuntime
from engine.sae import decoder_layers
from engine.steering import SteeringFeature, SteeringSpec

PROMPT = "The cat sat on the mat"


@pytest.fixture(scope="module")
def runtime(test_tier_assets):
    runtime = EngineRuntime(torch_threads=1)
    runtime.load(name="tiny", path=str(test_tier_assets.model.local_path))
    runtime.attach_sae(name="sae", path=str(test_tier_assets.sae.local_path))
    runtime.configure_monitoring(enabled=False)
    yield runtime
    runtime.unload()


def run(runtime: EngineRuntime, request_id: str, **kwargs) -> tuple[list[int], list[dict], list[dict]]:
    """Generate greedily; (generated ids, returned feature frames, monitoring frames)."""
    submitted = runtime.submit(request_id=request_id, model=None, prompt=PROMPT, messages=None,
                               params={"max_tokens": 5, "temperature": 0.0}, **{"steering": None, **kwargs})
    ids, returned, monitored = [], [], []
    for event in submitted.handle:
        if isinstance(event, TokenEvent):
            ids.append(event.token_id)
            if submitted.features is not None:
                returned += submitted.features.frames(event.token_id, event.captures)
            if submitted.frames is not None:
                monitored += submitted.frames.frames(event.token_id, event.captures)
        else:
            assert isinstance(event, FinishEvent) and event.finish_reason == "length"
    return ids, returned, monitored


def reference_features(runtime: EngineRuntime, token_ids: list[int], delta: torch.Tensor | None = None) -> torch.Tensor:
    """encode(h_L (+ delta)) at every position of one unsteered forward pass, (T, d_sae)."""
    sae = runtime.hook.sae
    kept = {}

    def work():
        layer = decoder_layers(runtime.loaded.model)[sae.hook_layer]
        handle = layer.register_forward_hook(lambda _m, _a, out: kept.setdefault("h", out[0] if isinstance(out, tuple) else out))
        try:
            runtime.loaded.model(torch.tensor([token_ids]))
        finally:
            handle.remove()
        h = kept["h"][0]
        return sae.encode(h + delta if delta is not None else h)

    return runtime.scheduler.call(work).result()


def expected_frames(runtime, prompt_ids, generated, features: torch.Tensor, *, top_k, extra=(), positions="all"):
    frames = []
    inputs = prompt_ids + generated[:-1]  # the last generated token is never an input
    for t, token_id in enumerate(inputs):
        kind = "prompt" if t < len(prompt_ids) else "generated"
        if positions not in ("all", kind):
            continue
        values, indices = torch.topk(features[t], k=top_k)
        row = {str(i): round(v, 4) for i, v in zip(indices.tolist(), values.tolist(), strict=True) if v > 0}
        row.update({str(i): round(features[t, i].item(), 4) for i in extra})
        frames.append({"position": t, "type": kind, "token_id": token_id, "features": row})
    return frames


def comparable(frames):
    return [{k: f[k] for k in ("position", "type", "token_id", "features")} for f in frames]


def close(actual, expected):
    assert [(f["position"], f["type"], f["token_id"]) for f in actual] == \
        [(f["position"], f["type"], f["token_id"]) for f in expected]
    for a, e in zip(actual, expected, strict=True):
        assert a["features"].keys() == e["features"].keys(), (a, e)
        for key, value in e["features"].items():
            assert a["features"][key] == pytest.approx(value, abs=2e-4)


def test_features_before_steering_are_the_unsteered_encoding_of_the_row(runtime):
    prompt_ids = list(runtime.loaded.tokenizer(PROMPT)["input_ids"])
    steering = SteeringSpec(features=(SteeringFeature(7, 40.0),))
    ids, returned, monitored = run(runtime, "a", steering=steering,
                                   features=FeatureRequest(top_k=3, features=(7, 2)))
    assert monitored == []  # monitoring is off: only the request's own frames
    reference = reference_features(runtime, prompt_ids + ids)
    close(comparable(returned), expected_frames(runtime, prompt_ids, ids, reference, top_k=3, extra=(7, 2)))
    assert returned[0]["token"] == runtime.loaded.tokenizer.decode([prompt_ids[0]])


def test_features_after_steering_see_the_delta_and_positions_filter(runtime):
    prompt_ids = list(runtime.loaded.tokenizer(PROMPT)["input_ids"])
    steering = SteeringSpec(features=(SteeringFeature(7, 40.0),))
    ids, returned, _ = run(runtime, "b", steering=steering,
                           features=FeatureRequest(top_k=4, positions="generated", after_steering=True))
    delta = runtime.compile(steering).additive_delta
    reference = reference_features(runtime, prompt_ids + ids, delta)
    expected = expected_frames(runtime, prompt_ids, ids, reference, top_k=4, positions="generated")
    assert len(expected) == len(ids) - 1 == 4
    close(comparable(returned), expected)
    unsteered = expected_frames(runtime, prompt_ids, ids, reference_features(runtime, prompt_ids + ids), top_k=4,
                                positions="generated")
    assert [f["features"] for f in comparable(returned)] != [f["features"] for f in unsteered]


def test_a_batch_mixing_monitored_and_requesting_rows_gives_each_its_own(runtime):
    runtime.configure_monitoring(enabled=True, top_k=2, features=[])
    try:
        alone_ids, alone, _ = run(runtime, "solo", features=FeatureRequest(top_k=6))
        futures = [runtime.submit(request_id=f"r{i}", model=None, prompt=PROMPT, messages=None,
                                  params={"max_tokens": 5, "temperature": 0.0}, steering=None,
                                  features=FeatureRequest(top_k=6) if i == 1 else None) for i in range(3)]
        results = []
        for submitted in futures:
            returned, monitored, ids = [], [], []
            for event in submitted.handle:
                if isinstance(event, TokenEvent):
                    ids.append(event.token_id)
                    monitored += submitted.frames.frames(event.token_id, event.captures)
                    if submitted.features is not None:
                        returned += submitted.features.frames(event.token_id, event.captures)
            results.append((ids, returned, monitored))
    finally:
        runtime.configure_monitoring(enabled=False, top_k=10)
    assert all(ids == alone_ids for ids, _, _ in results)
    close(comparable(results[1][1]), comparable(alone))
    for _, _returned, monitored in results:
        assert monitored and all(len(f["features"]) <= 2 for f in monitored)  # the monitor's own top-k
    assert max(len(f["features"]) for f in results[1][1]) > 2


def test_bad_feature_requests_are_refused_before_anything_runs(runtime, test_tier_assets):
    d_sae = runtime.hook.sae.d_sae
    for bad, error in ((FeatureRequest(features=(d_sae,)), InvalidFeatureIndexError),
                       (FeatureRequest(top_k=0), InvalidRequestError),
                       (FeatureRequest(top_k=1000), InvalidRequestError),
                       (FeatureRequest(positions="middle"), InvalidRequestError)):
        with pytest.raises(error) as refused:
            run(runtime, "bad", features=bad)
        assert 400 <= refused.value.status < 500
    assert runtime.scheduler.status().active == 0
    runtime.detach_sae()
    try:
        with pytest.raises(SaeNotAttachedError):
            run(runtime, "no-sae", features=FeatureRequest())
    finally:
        runtime.attach_sae(name="sae", path=str(test_tier_assets.sae.local_path))
