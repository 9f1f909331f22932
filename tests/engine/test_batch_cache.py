"""The preallocated KV cache: the same tokens as HF's DynamicCache, with the SAE hook, steering and
monitoring applied on every token, while rows join, leave and outgrow the buffer's headroom."""

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from engine.batch_cache import PreallocatedLayer, new_cache
from engine.generation import FinishEvent, GenerationRequest
from engine.runtime import EngineRuntime
from engine.sampling import SamplingParams
from engine.steering import SteeringFeature, SteeringSpec

PROMPTS = ("The cat sat on the", "Once upon a time, in a city by the sea,", "Hello", "A B C D E F G H I J K")


@pytest.fixture(scope="module")
def runtime(test_tier_assets):
    runtime = EngineRuntime()
    runtime.load(name="tiny", path=str(test_tier_assets.model.local_path))
    runtime.attach_sae(name="sae", path=str(test_tier_assets.sae.local_path))
    runtime.configure_monitoring(top_k=5, features=[0, 3, 7])
    yield runtime
    runtime.unload()


def batched_run(runtime: EngineRuntime, steering) -> list[list[int]]:
    """Two waves of greedy, monitored, steered requests of different lengths (one past the headroom)."""
    lengths = [PreallocatedLayer.HEADROOM + 20, 9, 30, 14, 5, 41, 22, 12]

    def submit(i: int):
        params = SamplingParams(max_tokens=lengths[i], temperature=0.0, ignore_eos=True)
        return runtime.scheduler.submit(GenerationRequest(PROMPTS[i % 4] + " x" * i, params, steering=steering,
                                                          monitor=True))
    first = [submit(i) for i in range(4)]
    head = first[0].get(timeout=120)
    second = [submit(i) for i in range(4, 8)]
    out = []
    for n, handle in enumerate(first + second):
        ids = [e.token_id for e in handle if not isinstance(e, FinishEvent)]
        out.append([head.token_id, *ids] if n == 0 else ids)
    assert [len(ids) for ids in out] == lengths
    return out


def test_preallocated_cache_equals_dynamic_cache_with_sae_steering_and_monitoring(runtime):
    assert all(isinstance(layer, PreallocatedLayer) for layer in new_cache(runtime.loaded.model.config).layers)
    steering = runtime.compile(SteeringSpec(features=(SteeringFeature(7, 40.0),)))
    preallocated = batched_run(runtime, steering)
    runtime.scheduler.call(lambda: setattr(runtime.scheduler, "preallocated_cache", False)).result(timeout=30)
    try:
        dynamic = batched_run(runtime, steering)
    finally:
        runtime.scheduler.preallocated_cache = True
    assert preallocated == dynamic
    unsteered = batched_run(runtime, None)
    assert unsteered != preallocated  # the steering did act on these tokens


def test_layer_grows_in_place_and_keeps_keys_and_values_apart():
    layer, reference = PreallocatedLayer(), DynamicLayer()
    for width in (5, *[1] * (PreallocatedLayer.HEADROOM + 10), 70):  # a prefill, decode steps, a wide chunk
        k, v = torch.randn(2, 3, width, 4), torch.randn(2, 3, width, 4)
        got, want = layer.update(k, v), reference.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert layer.get_seq_length() == reference.get_seq_length() == 5 + PreallocatedLayer.HEADROOM + 10 + 70
    # merge/select assign keys first, then read values: each keeps its own length
    layer.keys = reference.keys[:, :, 3:]
    assert torch.equal(layer.values, reference.values)
    layer.values = reference.values[:, :, 3:]
    assert torch.equal(layer.values, reference.values[:, :, 3:]) and layer.get_seq_length() == reference.get_seq_length() - 3
