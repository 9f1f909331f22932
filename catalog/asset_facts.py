"""What a model or SAE folder is, read from its small files only (no torch, no weights loaded).

Models: `config.json` for the shape, the safetensors headers for an exact parameter count (a JSON
header at the start of each file lists every tensor's shape). SAEs: sae-lens' `cfg.json`, both the
6.x layout (hook name under `metadata`) and the older flat one (`hook_point`, `hook_point_layer`).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import rules
from engine.errors import UnsupportedSaeError
from millm_site.errors import ValidationFailed

_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "fp32": "float32", "fp16": "float16",
           "bf16": "bfloat16"}
_ARCHITECTURES = {"standard": "standard", "relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class ModelFacts:
    hidden_size: int | None
    num_layers: int | None
    context_length: int | None
    parameter_count: int | None
    dtype: str


@dataclass(frozen=True)
class SaeFacts:
    d_in: int
    d_sae: int
    hook_name: str
    layer: int
    architecture: str


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValidationFailed(f"{path.name} is missing in {path.parent}", details={"field": "path"}) from None
    except (OSError, ValueError) as exc:
        raise ValidationFailed(f"{path.name} in {path.parent} is not readable JSON: {exc}",
                               details={"field": "path"}) from None
    if not isinstance(data, dict):
        raise ValidationFailed(f"{path.name} in {path.parent} is not a JSON object", details={"field": "path"})
    return data


def _first_int(config: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def config_needs_remote_code(folder: Path) -> bool:
    """True when config.json maps the model to code shipped in the repo (transformers' `auto_map`)."""
    return "auto_map" in _read_json(Path(folder) / "config.json")


def model_facts(folder: Path) -> ModelFacts:
    config = _read_json(Path(folder) / "config.json")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    hidden = _first_int(text, "hidden_size", "n_embd", "d_model")
    layers = _first_int(text, "num_hidden_layers", "n_layer", "num_layers")
    context = _first_int(text, "max_position_embeddings", "n_positions", "n_ctx", "max_seq_len")
    dtype = _DTYPES.get(str(config.get("dtype") or config.get("torch_dtype") or "float32").lower(), "float32")
    count = safetensors_parameter_count(Path(folder))
    if count is None and hidden and layers:
        # No safetensors (e.g. only .bin): a decoder's usual 12·L·h² plus embeddings, as an estimate.
        vocab = _first_int(text, "vocab_size") or 0
        tied = bool(config.get("tie_word_embeddings", True))
        count = 12 * layers * hidden * hidden + vocab * hidden * (1 if tied else 2)
    return ModelFacts(hidden_size=hidden, num_layers=layers, context_length=context, parameter_count=count or None,
                      dtype=dtype)


def safetensors_parameter_count(folder: Path) -> int | None:
    """Exact parameter count from the headers of the folder's *.safetensors files (None if there are none)."""
    total, seen = 0, False
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                continue
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER_BYTES:
                continue
            try:
                header = json.loads(f.read(length))
            except ValueError:
                continue
        seen = True
        total += sum(math.prod(t.get("shape", [])) for k, t in header.items() if k != "__metadata__")
    return total if seen else None


def hook_layer_from_name(hook_name: str) -> int:
    """Decoder layer whose output the hook reads (engine.rules), refused in the /api's terms."""
    try:
        return rules.hook_layer_from_name(hook_name)
    except UnsupportedSaeError as exc:
        raise ValidationFailed(exc.message, details={"field": "hook_name"}) from None


def sae_facts(folder: Path) -> SaeFacts:
    cfg = _read_json(Path(folder) / "cfg.json")
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook_name = metadata.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    d_in, d_sae = _first_int(cfg, "d_in"), _first_int(cfg, "d_sae")
    if not (hook_name and d_in and d_sae):
        raise ValidationFailed(f"cfg.json in {folder} lacks d_in, d_sae or a hook name (not a sae-lens SAE?)",
                               details={"field": "path"})
    raw_arch = str(cfg.get("architecture") or cfg.get("activation_fn_str") or "standard").lower()
    architecture = _ARCHITECTURES.get(raw_arch)
    if architecture is None:
        raise ValidationFailed(f"SAE architecture {raw_arch!r} is not supported (standard, jumprelu, topk)",
                               details={"field": "architecture"})
    return SaeFacts(d_in=d_in, d_sae=d_sae, hook_name=str(hook_name), layer=hook_layer_from_name(str(hook_name)),
                    architecture=architecture)
