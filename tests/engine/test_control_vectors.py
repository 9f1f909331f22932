"""Steering vectors and llama.cpp control-vector GGUF files: the GGUF round trip and its refusals, a vector
added exactly at its layer (hand-computed residual), vectors with no SAE attached, SAE steering exported as a
control vector, and a batch mixing rows with and without vectors."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch

from engine.control_vector_files import (
    ControlVector,
    ControlVectorFileError,
    read_control_vector_gguf,
    read_repeng_json,
    write_control_vector_gguf,
    write_repeng_json,
)
from engine.control_vectors import LayerVector, VectorSteeringSpec, layer_vector, steering_control_vector
from engine.errors import InvalidSteeringError
from engine.generation import TokenEvent
from engine.runtime import EngineRuntime
from engine.sae import decoder_layers
from engine.steering import SteeringFeature, SteeringSpec
from engine.steering_conditions import ConditionalFeature, FeatureCondition, SteeringConditions

PROMPT = "The cat sat on the mat and the dog"


def vector(width: int = 8, layers=(1, 3)) -> ControlVector:
    generator = torch.Generator().manual_seed(3)
    return ControlVector(model_hint="llama",
                         directions={n: torch.randn(width, generator=generator).numpy() for n in layers})


def test_gguf_round_trip_is_exact_and_carries_what_llama_cpp_and_repeng_read(tmp_path):
    original = vector()
    data = write_control_vector_gguf(original)
    back = read_control_vector_gguf(data)
    assert back.model_hint == "llama" and back.layers == [1, 3]
    for layer in (1, 3):
        assert np.array_equal(back.directions[layer], original.directions[layer])
    again = read_repeng_json(write_repeng_json(back))  # repeng's dataclass as JSON
    assert again.model_hint == "llama" and all(np.array_equal(again.directions[n], back.directions[n]) for n in (1, 3))
    # What llama.cpp's loader and repeng's import_gguf look at, read with the reference reader.
    path = tmp_path / "v.gguf"
    path.write_bytes(data)
    reader = gguf.GGUFReader(path)
    field = reader.get_field("general.architecture")
    assert bytes(field.parts[-1]).decode() == "controlvector"
    assert bytes(reader.get_field("controlvector.model_hint").parts[-1]).decode() == "llama"
    assert int(reader.get_field("controlvector.layer_count").parts[-1][0]) == 2
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.3"]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [8] for t in tensors.values())


def write_raw(tmp_path, tensors: dict[str, np.ndarray], architecture: str = "controlvector") -> bytes:
    path = tmp_path / "raw.gguf"
    writer = gguf.GGUFWriter(str(path), architecture)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def test_malformed_files_are_refused_with_the_reason(tmp_path):
    good = write_control_vector_gguf(vector())
    cases = [
        (b"not a gguf at all", "GGUF magic"),
        (good[:40], "not a readable GGUF"),
        (write_raw(tmp_path, {"direction.2": np.ones(4, dtype=np.float16)}), "not F32"),
        (write_raw(tmp_path, {"blk.0.attn_q.weight": np.ones(4, dtype=np.float32)}), "direction.<layer>"),
        (write_raw(tmp_path, {"direction.1": np.ones(4, dtype=np.float32),
                              "direction.2": np.ones(5, dtype=np.float32)}), "width 5"),
        (write_raw(tmp_path, {"direction.1": np.full(4, np.nan, dtype=np.float32)}), "NaN"),
        (write_raw(tmp_path, {"direction.1": np.ones(4, dtype=np.float32)}, architecture="llama"), "not a control"),
        (write_raw(tmp_path, {}), "no direction"),
    ]
    for data, reason in cases:
        with pytest.raises(ControlVectorFileError, match=reason):
            read_control_vector_gguf(data)


def test_layer_zero_is_not_exported_for_llama_cpp():
    with pytest.raises(ControlVectorFileError, match="layer 0"):
        write_control_vector_gguf(vector(layers=(0, 2)))
    assert read_control_vector_gguf(write_control_vector_gguf(vector(layers=(0, 2)), for_llama_cpp=False)).layers == [0, 2]


@pytest.fixture(scope="module")
def runtime(test_tier_assets):
    runtime = EngineRuntime(torch_threads=1)
    runtime.load(name="tiny", path=str(test_tier_assets.model.local_path))
    runtime.configure_monitoring(enabled=False)
    yield runtime
    runtime.unload()


def width(runtime) -> int:
    return int(runtime.loaded.model.config.hidden_size)


def layer_output(runtime, layer: int, spec) -> torch.Tensor:
    """The output of decoder block `layer` during the prefill of PROMPT under `spec` (as steered)."""
    outputs = []
    module = decoder_layers(runtime.loaded.model)[layer]
    handle = runtime.scheduler.call(lambda: module.register_forward_hook(
        lambda _m, _a, out: outputs.append((out[0] if isinstance(out, tuple) else out).clone()))).result()
    try:
        list(runtime.submit(request_id=f"v{id(outputs)}", model=None, prompt=PROMPT, messages=None,
                            params={"max_tokens": 1, "temperature": 0.0}, steering=spec).handle)
    finally:
        runtime.scheduler.call(handle.remove).result()
    return outputs[0]


def test_a_vector_is_added_exactly_at_its_layer_with_no_sae_attached(runtime):
    assert not runtime.hook.attached
    layer = 1
    direction = torch.linspace(-1.0, 1.0, width(runtime))
    plain = layer_output(runtime, layer, None)
    spec = VectorSteeringSpec(features=(), vectors=(LayerVector({layer: direction}, strength=2.5),))
    steered = layer_output(runtime, layer, spec)
    # Every prompt position: h' = h + 2.5 d, nothing else.
    torch.testing.assert_close(steered, plain + 2.5 * direction, atol=1e-5, rtol=0)
    # The layer before is untouched.
    torch.testing.assert_close(layer_output(runtime, 0, spec), layer_output(runtime, 0, None))


def test_vectors_of_the_wrong_width_or_layer_are_refused_naming_the_width(runtime):
    d = width(runtime)
    for bad, reason in (
        (LayerVector({1: torch.ones(d + 1)}), f"width {d + 1}; this model's residual stream has width {d}"),
        (LayerVector({99: torch.ones(d)}), "layer 99"),
        (LayerVector({1: torch.ones(d)}, strength=math.nan), "finite"),
        (LayerVector({1: torch.full((d,), math.inf)}), "NaN or infinite"),
    ):
        with pytest.raises(InvalidSteeringError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            runtime.set_active_steering(VectorSteeringSpec(features=(), vectors=(bad,)), label="active")
        assert runtime.active_steering is None and runtime.active_label == "none"


def test_sae_steering_exports_its_delta_at_each_layer(runtime, test_tier_assets):
    runtime.attach_sae(name="sae", path=str(test_tier_assets.sae.local_path))
    try:
        sae = runtime.hook.sae
        spec = SteeringSpec(features=(SteeringFeature(7, 3.0), SteeringFeature(2, -1.5)))
        exported = steering_control_vector(runtime.compile(spec), sae_layer=sae.hook_layer, model_hint="llama")
        assert exported.layers == [sae.hook_layer]
        torch.testing.assert_close(torch.from_numpy(exported.directions[sae.hook_layer]),
                                   3.0 * sae.W_dec[7] - 1.5 * sae.W_dec[2])
        # Served back as a vector, the exported file steers exactly as the features did.
        served = VectorSteeringSpec(features=(), vectors=(layer_vector(read_control_vector_gguf(
            write_control_vector_gguf(exported))),))
        assert generate(runtime, served) == generate(runtime, spec)
        with pytest.raises(InvalidSteeringError, match="additive"):
            steering_control_vector(runtime.compile(SteeringSpec(features=(SteeringFeature(7, 3.0),), mode="clamp")),
                                    sae_layer=sae.hook_layer, model_hint="llama")
    finally:
        runtime.detach_sae()


def generate(runtime, spec) -> list[int]:
    handle = runtime.submit(request_id=f"g{id(spec)}", model=None, prompt=PROMPT, messages=None,
                            params={"max_tokens": 8, "temperature": 0.0}, steering=spec).handle
    return [e.token_id for e in handle if isinstance(e, TokenEvent)]


def test_a_batch_mixing_rows_with_and_without_vectors_and_conditions_gives_each_row_its_alone_text(runtime, test_tier_assets):
    runtime.attach_sae(name="sae", path=str(test_tier_assets.sae.local_path))
    try:
        d = width(runtime)
        generator = torch.Generator().manual_seed(5)
        push = LayerVector({1: 6.0 * torch.randn(d, generator=generator)}, strength=1.0)
        other = LayerVector({0: 4.0 * torch.randn(d, generator=generator),
                             2: 4.0 * torch.randn(d, generator=generator)}, strength=-1.0)
        gated = SteeringConditions(features=(ConditionalFeature(3, 25.0, FeatureCondition(7, below=1e6)),))
        rows = [  # (steering, conditions)
            (None, None),
            (VectorSteeringSpec(features=(), vectors=(push,)), None),
            (SteeringSpec(features=(SteeringFeature(7, 40.0),)), None),
            (VectorSteeringSpec(features=(SteeringFeature(7, 40.0),), vectors=(push, other)), None),
            (VectorSteeringSpec(features=(), vectors=(other,), positions="generated_only"), None),
            (VectorSteeringSpec(features=(), vectors=(push,)), gated),  # a vector and a conditional feature
        ]

        def submit(n: int, row):
            spec, conditions = row
            return runtime.submit(request_id=f"vmix{n}-{id(row)}", model=None, prompt=PROMPT, messages=None,
                                  params={"max_tokens": 8, "temperature": 0.0}, steering=spec,
                                  conditions=conditions).handle

        def tokens(handle):
            return [e.token_id for e in handle if isinstance(e, TokenEvent)]

        alone = [tokens(submit(n, row)) for n, row in enumerate(rows)]
        assert len({tuple(t) for t in alone}) >= 5  # the vectors and the condition do change the text
        handles = runtime.scheduler.call(lambda: [submit(n, row) for n, row in enumerate(rows)]).result()
        assert [tokens(handle) for handle in handles] == alone
    finally:
        runtime.detach_sae()
