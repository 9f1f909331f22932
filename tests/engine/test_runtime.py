"""The inference process's runtime: an SAE that does not fit is refused whole and the model serves on."""

import pytest

from engine.errors import InsufficientMemoryError, SaeNotAttachedError
from engine.generation import FinishEvent, GenerationRequest
from engine.runtime import EngineRuntime
from engine.sampling import SamplingParams
from engine.steering import SteeringFeature, SteeringSpec


def spec(index: int, strength: float) -> SteeringSpec:
    return SteeringSpec(features=(SteeringFeature(index, strength),))


def generate(runtime: EngineRuntime, steering=None) -> list[int]:
    handle = runtime.scheduler.submit(GenerationRequest("The cat", SamplingParams(max_tokens=6, temperature=0.0),
                                                        steering=steering))
    return [e.token_id for e in handle if not isinstance(e, FinishEvent)]


@pytest.fixture
def runtime(test_tier_assets):
    runtime = EngineRuntime(memory_limit_bytes=10_000)  # the test SAE's weights are ~130 KB
    runtime.load(name="tiny", path=str(test_tier_assets.model.local_path))
    yield runtime
    runtime.unload()


def test_an_sae_that_does_not_fit_is_refused_and_the_model_serves_on(runtime, test_tier_assets):
    before = generate(runtime)
    with pytest.raises(InsufficientMemoryError, match="MiB are free"):
        runtime.attach_sae(name="sae", path=str(test_tier_assets.sae.local_path))
    assert not runtime.hook.attached and runtime.sae_name is None
    assert generate(runtime) == before
    with pytest.raises(SaeNotAttachedError) as refused:
        runtime.compile(spec(7, 10.0))
    assert (refused.value.code, refused.value.status) == ("SAE_NOT_ATTACHED", 400)


def test_insufficient_memory_carries_its_code_and_status():
    error = InsufficientMemoryError("too big")
    assert (error.code, error.status, error.message) == ("INSUFFICIENT_MEMORY", 507, "too big")


def test_with_room_the_sae_attaches_and_steers(runtime, test_tier_assets):
    runtime.memory_limit_bytes = None
    plain = generate(runtime)
    runtime.attach_sae(name="sae", path=str(test_tier_assets.sae.local_path))
    steered = generate(runtime, runtime.compile(spec(7, 80.0)))
    assert steered != plain
    runtime.detach_sae()
    assert generate(runtime) == plain
