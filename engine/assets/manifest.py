"""What an asset builder hands back, so the catalog can register it without knowing torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class FeatureLabel:
    index: int
    label: str
    description: str = ""
    max_activation: float | None = None  # typical max activation: the unit of "max_activation" strengths


@dataclass(frozen=True)
class BuiltModel:
    repo_id: str  # catalog identity, e.g. "millm/tiny-llama" or "HuggingFaceTB/SmolLM2-135M-Instruct"
    local_path: Path  # a folder that AutoModelForCausalLM/AutoTokenizer.from_pretrained loads offline
    parameter_count: int
    dtype: str  # "float32", "bfloat16", ...
    hidden_size: int
    num_layers: int
    context_length: int


@dataclass(frozen=True)
class BuiltSAE:
    repo_id: str  # catalog identity, e.g. "millm/tiny-llama-sae"
    sae_id: str  # e.g. "layer_1"
    local_path: Path  # a folder that sae_lens.SAE.load_from_disk loads (cfg.json + sae_weights.safetensors)
    layer: int  # residual stream after decoder block `layer` (model.model.layers[layer] output)
    hook_name: str  # sae-lens hook name, "blocks.{layer}.hook_resid_post"
    d_in: int
    d_sae: int
    architecture: str  # "standard", "jumprelu", "topk"
    labels: tuple[FeatureLabel, ...] = field(default_factory=tuple)
    residual_norm: float | None = None  # median L2 norm of the hooked residual: the unit of "residual_norm"


@dataclass(frozen=True)
class DemoAssets:
    model: BuiltModel
    sae: BuiltSAE
    # More SAEs on the same model (several can be attached at once), registered beside `sae`.
    extra_saes: tuple[BuiltSAE, ...] = ()
