"""Monitoring frames with several SAEs attached (test tier: "late" after block 2, the default; "early" after
block 1): a monitored request gets one frame per (token position, SAE), in attach order, each naming its SAE
and holding that SAE's own top-k of the residual at its layer, computed here by hand from a plain forward pass;
the pinned monitored features stay the default SAE's. With one SAE the frames are as they always were."""

from __future__ import annotations

import pytest
import torch

from engine.activation_frames import FrameBuilder
from engine.generation import TokenEvent
from engine.runtime import EngineRuntime
from engine.sae import decoder_layers

CAT = 7  # the ' cat' word feature of both test-tier SAEs (engine/assets/tiny.py)
PROMPT = "The cat sat on the mat and the dog"
LATE, EARLY = "late", "early"
TOP_K = 4


@pytest.fixture(scope="module")
def runtime(test_tier_assets):
    runtime = EngineRuntime(torch_threads=1)
    runtime.load(name="tiny", path=str(test_tier_assets.model.local_path))
    runtime.attach_sae(name=LATE, path=str(test_tier_assets.sae.local_path))
    runtime.attach_sae(name=EARLY, path=str(test_tier_assets.extra_saes[0].local_path))
    runtime.configure_monitoring(enabled=True, top_k=TOP_K, features=[CAT])
    yield runtime
    runtime.unload()


def monitored_run(runtime: EngineRuntime, request_id: str, max_tokens: int = 4):
    """Greedy generation with monitoring on: (prompt ids, generated ids, frames, the frame builder)."""
    submitted = runtime.submit(request_id=request_id, model=None, prompt=PROMPT, messages=None,
                               params={"max_tokens": max_tokens, "temperature": 0.0}, steering=None, monitor=True)
    generated, frames = [], []
    for event in submitted.handle:
        if isinstance(event, TokenEvent):
            generated.append(event.token_id)
            frames += submitted.frames.frames(event.token_id, event.captures)
    prompt_ids = list(runtime.loaded.tokenizer(PROMPT)["input_ids"])
    return prompt_ids, generated, frames, submitted.frames


def encoded_at_layer(runtime: EngineRuntime, name: str, token_ids: list[int]) -> torch.Tensor:
    """SAE `name`'s encode of the residual after its hook layer, at every position of one unsteered pass: (T, d_sae)."""
    weights, kept = runtime.attached[name].sae, []
    layer = decoder_layers(runtime.loaded.model)[weights.hook_layer]

    def work():
        handle = layer.register_forward_hook(lambda _m, _a, out: kept.append(out[0] if isinstance(out, tuple) else out))
        try:
            runtime.loaded.model(torch.tensor([token_ids]))
        finally:
            handle.remove()
        return weights.encode(kept[0][0])

    return runtime.scheduler.call(work).result()


def expected_features(features: torch.Tensor, t: int, *, pinned=()) -> dict[str, float]:
    values, indices = torch.topk(features[t], k=TOP_K)
    row = {str(i): round(v, 4) for i, v in zip(indices.tolist(), values.tolist(), strict=True) if v > 0}
    row.update({str(i): round(features[t, i].item(), 4) for i in pinned})
    return row


def test_every_attached_sae_gives_a_frame_per_token_with_its_own_top_k(runtime):
    prompt_ids, generated, frames, _ = monitored_run(runtime, "frames-two")
    inputs = prompt_ids + generated[:-1]  # the last generated token is never an input
    assert len(generated) == 4
    # One frame per (position, SAE), the SAEs of a position in attach order.
    assert [(f["position"], f["sae"]) for f in frames] == [(t, name) for t in range(len(inputs))
                                                           for name in (LATE, EARLY)]
    encoded = {name: encoded_at_layer(runtime, name, inputs) for name in (LATE, EARLY)}
    assert runtime.attached[LATE].sae.hook_layer != runtime.attached[EARLY].sae.hook_layer
    for frame in frames:
        t = frame["position"]
        assert frame["type"] == ("prompt" if t < len(prompt_ids) else "generated")
        assert frame["token_id"] == inputs[t]
        # The pinned monitored feature is the default SAE's only.
        expected = expected_features(encoded[frame["sae"]], t, pinned=(CAT,) if frame["sae"] == LATE else ())
        assert frame["features"].keys() == expected.keys(), (frame["sae"], t)
        for index, value in expected.items():
            assert frame["features"][index] == pytest.approx(value, abs=1e-3)
    # The two SAEs read different layers, so their frames differ somewhere.
    late = [f["features"] for f in frames if f["sae"] == LATE]
    early = [f["features"] for f in frames if f["sae"] == EARLY]
    assert late != early
    assert any(f["features"] for f in frames if f["sae"] == EARLY)


def test_the_monitoring_top_k_applies_to_every_sae(runtime):
    runtime.configure_monitoring(top_k=2)
    try:
        _, _, frames, _ = monitored_run(runtime, "frames-top-2", max_tokens=2)
    finally:
        runtime.configure_monitoring(top_k=TOP_K)
    early = [f for f in frames if f["sae"] == EARLY]
    late = [f for f in frames if f["sae"] == LATE]
    assert early and late
    assert max(len(f["features"]) for f in early) == 2
    assert max(len(set(f["features"]) - {str(CAT)}) for f in late) == 2


def test_one_sae_attached_frames_are_unchanged(test_tier_assets):
    single = EngineRuntime(torch_threads=1)
    single.load(name="tiny", path=str(test_tier_assets.model.local_path))
    try:
        single.attach_sae(name=LATE, path=str(test_tier_assets.sae.local_path))
        single.configure_monitoring(enabled=True, top_k=TOP_K, features=[CAT])
        prompt_ids, generated, frames, builder = monitored_run(single, "frames-one", max_tokens=3)
        assert isinstance(builder, FrameBuilder)  # the one builder as before, not the per-SAE combination
        inputs = prompt_ids + generated[:-1]
        assert [f["position"] for f in frames] == list(range(len(inputs)))
        encoded = encoded_at_layer(single, LATE, inputs)
        for frame in frames:
            assert "sae" not in frame
            assert set(frame) == {"position", "type", "token", "token_id", "features", "produced_at"}
            expected = expected_features(encoded, frame["position"], pinned=(CAT,))
            assert frame["features"].keys() == expected.keys()
            for index, value in expected.items():
                assert frame["features"][index] == pytest.approx(value, abs=1e-3)
    finally:
        single.unload()


def test_a_chunked_prefill_gives_the_same_frames_of_both_saes(runtime):
    scheduler = runtime.scheduler
    before = scheduler.prefill_chunk_tokens, scheduler._chunk_tokens
    results = {}
    try:
        for chunk in (3, 4096):
            scheduler.prefill_chunk_tokens = scheduler._chunk_tokens = chunk
            results[chunk] = monitored_run(runtime, f"frames-chunk-{chunk}", max_tokens=3)
    finally:
        scheduler.prefill_chunk_tokens, scheduler._chunk_tokens = before
    prompt_ids, _, chunked, _ = results[3]
    assert len(prompt_ids) > 3  # it really ran in chunks
    whole = results[4096][2]
    assert [(f["position"], f["sae"], f["token_id"]) for f in chunked] == \
        [(f["position"], f["sae"], f["token_id"]) for f in whole]
    for a, b in zip(chunked, whole, strict=True):
        assert a["features"].keys() == b["features"].keys(), (a, b)
        for key, value in b["features"].items():
            assert a["features"][key] == pytest.approx(value, abs=2e-4)
