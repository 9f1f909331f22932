"""A load that cannot work is refused before the serving model is unloaded: the old model serves on."""

import pytest

from engine.errors import ModelNotFoundError, UnsupportedConfigurationError
from engine.generation import FinishEvent, GenerationRequest
from engine.runtime import EngineRuntime
from engine.sampling import SamplingParams


def generate(runtime: EngineRuntime) -> list[int]:
    handle = runtime.scheduler.submit(GenerationRequest("The cat", SamplingParams(max_tokens=6, temperature=0.0)))
    return [e.token_id for e in handle if not isinstance(e, FinishEvent)]


@pytest.fixture(scope="module")
def runtime(test_tier_assets):
    runtime = EngineRuntime()
    runtime.load(name="tiny", path=str(test_tier_assets.model.local_path))
    yield runtime
    runtime.unload()


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"quantization": "q4", "gguf_file": "model.gguf"}, UnsupportedConfigurationError, "GGUF"),
    ({"quantization": "q3"}, UnsupportedConfigurationError, "quantization must be one of"),
    ({"dtype": "float8"}, UnsupportedConfigurationError, "dtype must be one of"),
    ({"path": "/nonexistent/model"}, ModelNotFoundError, "does not exist"),
])
def test_a_load_that_cannot_work_leaves_the_serving_model_loaded(runtime, test_tier_assets, options, error, match):
    before = generate(runtime)
    options = {"path": str(test_tier_assets.model.local_path), **options}
    with pytest.raises(error, match=match):
        runtime.load(name="other", **options)
    assert runtime.model_name == "tiny" and runtime.loaded is not None
    assert generate(runtime) == before
