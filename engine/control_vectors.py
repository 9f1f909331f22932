"""Steering vectors: a raw direction added to the output of a decoder layer, and the llama.cpp
control-vector GGUF files (also repeng's `ControlVector.export_gguf`) that carry them.

Math, per token with h_l the output of decoder block l (0-based, the same numbering as an SAE's
`hook_layer`): h_l' = h_l + Σ_v s_v · d_v[l] for every vector v with a direction at layer l.

The file (llama.cpp `common_control_vector_load_one`, `llama_adapter_cvec`; repeng `export_gguf`):
GGUF with `general.architecture = "controlvector"`, `controlvector.model_hint` (the model type, e.g.
"llama"), `controlvector.layer_count`, and one 1-D F32 tensor `direction.<k>` of n_embd per layer.
llama.cpp adds `direction.k` to `l_out` of block k (0-based), at every position: exactly our layer k.
It refuses `direction.0` (block 0's output cannot be steered there), so a vector at layer 0 is
served here but not exported; repeng's layers are 0-based `model.layers[i]` too (never 0 by default).
The file has no strength: llama.cpp scales it with `--control-vector-scaled FILE S`; here `strength`.

Vectors reach the hot path as additive `CompiledSteering.other_layers` (applied by
`engine/steering_layers.py`), merged into a row's SAE steering once per spec (`with_vectors`), so a
batch mixes rows with and without vectors at the cost of one stacked add per steered layer.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace

import gguf  # the reference reader/writer of the format (MIT; already a dependency for GGUF models)
import numpy as np
import torch

from engine.errors import InvalidSteeringError
from engine.rules import MAX_ABS_STRENGTH
from engine.sae import decoder_layers
from engine.steering import CompiledSteering, SteeringSpec

ARCHITECTURE = "controlvector"
MAX_VECTOR_FILE_BYTES = 64 << 20  # a 128-layer, 16384-wide f32 vector is 8 MiB; anything larger is not one


class ControlVectorFileError(ValueError):
    """A file that is not a usable control vector (the message says why, without a server path)."""


@dataclass(frozen=True, eq=False)
class ControlVector:
    """Directions per decoder layer, as a file carries them (unscaled)."""

    model_hint: str
    directions: dict[int, torch.Tensor]  # layer -> (d_model,) float32

    @property
    def d_model(self) -> int:
        return next(iter(self.directions.values())).shape[0]

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)


@dataclass(frozen=True, eq=False)  # identity equality: a spec holding one stays cheap to hash
class LayerVector:
    """One steering vector of a request or the active steering: Σ over its layers of strength · direction."""

    directions: dict[int, torch.Tensor]  # layer -> (d_model,)
    strength: float = 1.0
    name: str = ""  # a stored vector's name, for reports


@dataclass(frozen=True)
class VectorSteeringSpec(SteeringSpec):
    """A steering spec that also adds raw vectors (a subclass, so every SteeringSpec consumer takes it)."""

    vectors: tuple[LayerVector, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "vectors", tuple(self.vectors))


def spec_vectors(spec: SteeringSpec | None) -> tuple[LayerVector, ...]:
    return getattr(spec, "vectors", ()) if spec is not None else ()


def add_spec_vectors(compiled: CompiledSteering | None, spec: SteeringSpec, model: torch.nn.Module,
                     ) -> CompiledSteering | None:
    """The compiled SAE steering (None: no SAE features) with the spec's vectors merged in, after
    checking them against the model (width = hidden size, layer < number of decoder layers)."""
    vectors = spec_vectors(spec)
    if not vectors:
        return compiled
    d_model = int(model.config.hidden_size)
    validate_vectors(vectors, d_model=d_model, num_layers=len(decoder_layers(model)))
    device = compiled.feature_indices.device if compiled is not None else model_device(model)
    deltas = vector_deltas(vectors, device=device, dtype=torch.float32)
    return with_vectors(compiled, spec, deltas, d_model=d_model, device=device, dtype=torch.float32)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def validate_vectors(vectors: Sequence[LayerVector], *, d_model: int, num_layers: int,
                     max_abs_strength: float = MAX_ABS_STRENGTH) -> None:
    """Raise InvalidSteeringError unless every vector fits this model (width, layers, finite values)."""
    for position, vector in enumerate(vectors):
        label = f"vectors[{position}]" + (f" ({vector.name})" if vector.name else "")
        strength = vector.strength
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength):
            raise InvalidSteeringError(f"{label}.strength must be a finite number, got {strength!r}")
        if abs(strength) > max_abs_strength:
            raise InvalidSteeringError(f"{label}.strength {strength} exceeds the bound ±{max_abs_strength:g}")
        if not vector.directions:
            raise InvalidSteeringError(f"{label} has no layer")
        for layer, direction in vector.directions.items():
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
                raise InvalidSteeringError(f"{label}.layer {layer!r} must be an integer in [0, {num_layers})")
            if direction.ndim != 1 or direction.shape[0] != d_model:
                raise InvalidSteeringError(
                    f"{label}: the vector at layer {layer} has width {direction.shape[-1] if direction.ndim else 0}; "
                    f"this model's residual stream has width {d_model}")
            if not bool(torch.isfinite(direction).all()):
                raise InvalidSteeringError(f"{label}: the vector at layer {layer} has a NaN or infinite entry")


def vector_deltas(vectors: Sequence[LayerVector], *, device: torch.device | str, dtype: torch.dtype,
                  ) -> dict[int, torch.Tensor]:
    """Σ_v s_v · d_v[l] per layer l, summed in float32 (computed once per spec)."""
    sums: dict[int, torch.Tensor] = {}
    for vector in vectors:
        for layer, direction in vector.directions.items():
            term = direction.detach().to(device=device, dtype=torch.float32) * float(vector.strength)
            sums[layer] = sums[layer] + term if layer in sums else term
    return {layer: total.to(dtype) for layer, total in sums.items()}


def with_vectors(compiled: CompiledSteering | None, spec: SteeringSpec, deltas: dict[int, torch.Tensor],
                 *, d_model: int, device: torch.device | str, dtype: torch.dtype) -> CompiledSteering | None:
    """The row steering with the vectors' deltas added to its per-layer additive steering.

    Vectors go to `other_layers` at every layer, the SAE's own included, so they are added to the
    block's output after the SAE hook has read it (monitoring and conditions see the model's own
    residual, as with llama.cpp's l_out). Without SAE features the row still needs an additive
    (zero) delta at the SAE's layer, since an attached SAE hook stacks every row's."""
    if not deltas:
        return compiled
    plain = SteeringSpec(features=(), positions=spec.positions)  # additive, the spec's position rule
    if compiled is None:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        compiled = CompiledSteering(spec=spec, feature_indices=empty,
                                    additive_delta=torch.zeros(d_model, device=device, dtype=dtype))
    layers = dict(compiled.other_layers or {})
    for layer, delta in deltas.items():
        existing = layers.get(layer)
        total = delta if existing is None else existing.additive_delta + delta.to(existing.additive_delta)
        layers[layer] = CompiledSteering(spec=plain, feature_indices=compiled.feature_indices, additive_delta=total)
    return replace(compiled, other_layers=layers)


def steering_control_vector(compiled: CompiledSteering, *, sae_layer: int, model_hint: str) -> ControlVector:
    """The additive SAE steering as a control vector: Σ s_i W_dec[i] at the SAE's layer and each
    spread layer (already scaled to its norm), plus any vectors it carries."""
    if compiled.mode != "additive":
        raise InvalidSteeringError("only additive steering can be exported as a control vector "
                                   "(clamp depends on each token's own activation)")
    directions: dict[int, torch.Tensor] = {}
    if compiled.additive_delta is not None and bool(compiled.additive_delta.any()):
        directions[sae_layer] = compiled.additive_delta.detach().float().cpu()
    for layer, other in (compiled.other_layers or {}).items():
        delta = other.additive_delta.detach().float().cpu()
        directions[layer] = directions[layer] + delta if layer in directions else delta
    if not directions:
        raise InvalidSteeringError("the steering adds nothing: there is no control vector to export")
    return ControlVector(model_hint=model_hint, directions=directions)


# --- the GGUF file ----------------------------------------------------------------------------


def write_control_vector_gguf(vector: ControlVector, *, for_llama_cpp: bool = True) -> bytes:
    """The control vector as llama.cpp's GGUF (what repeng's export_gguf writes too)."""
    if for_llama_cpp and 0 in vector.directions:
        raise InvalidSteeringError("llama.cpp cannot steer layer 0 (it refuses direction.0): "
                                   "steer layer 1 or later to export for llama.cpp")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "vector.gguf")
        writer = gguf.GGUFWriter(path, ARCHITECTURE)
        writer.add_string(f"{ARCHITECTURE}.model_hint", vector.model_hint)
        writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(vector.directions))
        for layer in vector.layers:
            writer.add_tensor(f"direction.{layer}", vector.directions[layer].detach().float().cpu().numpy())
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


def _string_field(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or not field.parts:
        return None
    return bytes(field.parts[-1]).decode("utf-8", errors="replace")


def _control_vector(reader) -> ControlVector:
    architecture = _string_field(reader, "general.architecture")
    if architecture not in (None, ARCHITECTURE):
        raise ControlVectorFileError(f"general.architecture is {architecture!r}: not a control vector "
                                     f"(a model file, perhaps)")
    directions: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        prefix, _, suffix = tensor.name.partition(".")
        if prefix != "direction" or not suffix.isdigit():
            raise ControlVectorFileError(f"tensor {tensor.name[:80]!r} is not named direction.<layer>")
        layer = int(suffix)
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ControlVectorFileError(f"{tensor.name} is {tensor.tensor_type.name}, not F32")
        values = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        if len([d for d in tensor.shape if d != 1]) > 1:
            raise ControlVectorFileError(f"{tensor.name} is not one-dimensional")
        if not np.isfinite(values).all():
            raise ControlVectorFileError(f"{tensor.name} has a NaN or infinite entry")
        direction = torch.from_numpy(values.copy())
        if directions and direction.shape[0] != next(iter(directions.values())).shape[0]:
            raise ControlVectorFileError(f"{tensor.name} has width {direction.shape[0]}, unlike the other layers")
        # llama.cpp sums duplicate layers; so do we.
        directions[layer] = directions[layer] + direction if layer in directions else direction
    if not directions:
        raise ControlVectorFileError("the file has no direction.<layer> tensor")
    return ControlVector(model_hint=_string_field(reader, f"{ARCHITECTURE}.model_hint") or "", directions=directions)
