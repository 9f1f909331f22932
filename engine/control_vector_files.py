"""Control-vector files: llama.cpp's GGUF (what repeng's `ControlVector.export_gguf` writes too) and repeng's
`ControlVector` as JSON (`{"model_type", "directions": {layer: [floats]}}`, its dataclass fields).

No torch and no Django (numpy and `gguf` only): the web tier parses and writes files with it.

The GGUF (llama.cpp `common_control_vector_load_one`, `llama_adapter_cvec`; repeng `export_gguf`):
`general.architecture = "controlvector"`, `controlvector.model_hint` (the model type, e.g. "llama"),
`controlvector.layer_count`, and one 1-D F32 tensor `direction.<k>` of n_embd per layer. The operation
is add: llama.cpp adds `direction.k` to `l_out` of decoder block k (0-based), at every position, which
is miLLM's layer k (the numbering of an SAE's `hook_layer`; `engine/control_vectors.py`). llama.cpp
refuses `direction.0`, so a vector with a layer-0 direction is not exported for it. The file carries no
strength: llama.cpp scales it with `--control-vector-scaled FILE S`, miLLM with `strength`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import gguf  # the reference reader/writer of the format (MIT; already a dependency for GGUF models)
import numpy as np

ARCHITECTURE = "controlvector"
MAX_VECTOR_FILE_BYTES = 64 << 20  # a 128-layer, 16384-wide f32 vector is 8 MiB; anything larger is not one
MAX_VECTOR_LAYERS = 512


class ControlVectorFileError(ValueError):
    """A file that is not a usable control vector (the message says why, without a server path)."""


@dataclass(frozen=True, eq=False)
class ControlVector:
    """Directions per decoder layer, as a file carries them (unscaled)."""

    model_hint: str
    directions: dict[int, np.ndarray]  # layer -> (d_model,) float32

    @property
    def d_model(self) -> int:
        return int(next(iter(self.directions.values())).shape[0])

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)


def control_vector_check(model_hint: str, directions: dict[int, Any]) -> ControlVector:
    """Directions as float32 arrays of one width, finite, at non-negative integer layers."""
    if not directions:
        raise ControlVectorFileError("the vector has no layer")
    if len(directions) > MAX_VECTOR_LAYERS:
        raise ControlVectorFileError(f"the vector has {len(directions)} layers; at most {MAX_VECTOR_LAYERS}")
    checked: dict[int, np.ndarray] = {}
    width = None
    for layer, values in directions.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ControlVectorFileError(f"layer {layer!r} must be a non-negative integer")
        try:
            array = np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError):
            raise ControlVectorFileError(f"the direction at layer {layer} is not a list of numbers") from None
        if array.ndim != 1 or array.shape[0] == 0:
            raise ControlVectorFileError(f"the direction at layer {layer} is not one-dimensional")
        if not np.isfinite(array).all():
            raise ControlVectorFileError(f"the direction at layer {layer} has a NaN or infinite entry")
        if width is not None and array.shape[0] != width:
            raise ControlVectorFileError(f"the direction at layer {layer} has width {array.shape[0]}, "
                                         f"unlike the other layers ({width})")
        width = array.shape[0]
        checked[layer] = array
    return ControlVector(model_hint=model_hint, directions=checked)


def write_control_vector_gguf(vector: ControlVector, *, for_llama_cpp: bool = True) -> bytes:
    """The control vector as llama.cpp's GGUF."""
    if for_llama_cpp and 0 in vector.directions:
        raise ControlVectorFileError("llama.cpp cannot steer layer 0 (it refuses direction.0): "
                                     "steer layer 1 or later to export for llama.cpp")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "vector.gguf")
        writer = gguf.GGUFWriter(path, ARCHITECTURE)
        writer.add_string(f"{ARCHITECTURE}.model_hint", vector.model_hint)
        writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(vector.directions))
        for layer in vector.layers:
            writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(vector.directions[layer], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(path, "rb") as handle:
            return handle.read()


def read_control_vector_gguf(data: bytes) -> ControlVector:
    """Parse a control-vector GGUF; anything llama.cpp would refuse raises ControlVectorFileError."""
    if len(data) > MAX_VECTOR_FILE_BYTES:
        raise ControlVectorFileError(f"the file has {len(data)} bytes; a control vector has at most "
                                     f"{MAX_VECTOR_FILE_BYTES >> 20} MiB")
    if data[:4] != b"GGUF":
        raise ControlVectorFileError("not a GGUF file (it does not start with the GGUF magic)")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "vector.gguf")
        with open(path, "wb") as handle:
            handle.write(data)
        try:
            reader = gguf.GGUFReader(path, "r")
            return _control_vector(reader)
        except ControlVectorFileError:
            raise
        except Exception as exc:  # the reader's own errors on a truncated or corrupt file
            raise ControlVectorFileError(f"not a readable GGUF file ({exc.__class__.__name__})") from None


def _string_field(reader: gguf.GGUFReader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or not field.parts:
        return None
    return bytes(field.parts[-1]).decode("utf-8", errors="replace")


def _control_vector(reader: gguf.GGUFReader) -> ControlVector:
    architecture = _string_field(reader, "general.architecture")
    if architecture not in (None, ARCHITECTURE):
        raise ControlVectorFileError(f"general.architecture is {architecture[:40]!r}: not a control vector "
                                     f"(a model file, perhaps)")
    directions: dict[int, np.ndarray] = {}
    for tensor in reader.tensors:
        prefix, _, suffix = tensor.name.partition(".")
        if prefix != "direction" or not suffix.isdigit():
            raise ControlVectorFileError(f"tensor {tensor.name[:80]!r} is not named direction.<layer>")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ControlVectorFileError(f"{tensor.name} is {tensor.tensor_type.name}, not F32")
        if len([d for d in tensor.shape if d != 1]) > 1:
            raise ControlVectorFileError(f"{tensor.name} is not one-dimensional")
        values = np.array(tensor.data, dtype=np.float32).reshape(-1)  # a copy: the file goes away
        layer = int(suffix)
        if layer in directions and directions[layer].shape == values.shape:
            values = directions[layer] + values  # llama.cpp sums a layer given twice; so do we
        directions[layer] = values
    if not directions:
        raise ControlVectorFileError("the file has no direction.<layer> tensor")
    return control_vector_check(_string_field(reader, f"{ARCHITECTURE}.model_hint") or "", directions)


def read_repeng_json(data: Any) -> ControlVector:
    """repeng's ControlVector as JSON: {"model_type": str, "directions": {"<layer>": [floats]}}."""
    if not isinstance(data, dict) or not isinstance(data.get("directions"), dict):
        raise ControlVectorFileError('a repeng vector is {"model_type": ..., "directions": {"<layer>": [...]}}')
    directions = {}
    for key, values in data["directions"].items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise ControlVectorFileError(f"directions: layer {str(key)[:20]!r} is not an integer") from None
        directions[layer] = values
    model_type = data.get("model_type", "")
    return control_vector_check(model_type if isinstance(model_type, str) else "", directions)


def write_repeng_json(vector: ControlVector) -> dict[str, Any]:
    return {"model_type": vector.model_hint,
            "directions": {str(layer): vector.directions[layer].tolist() for layer in vector.layers}}
