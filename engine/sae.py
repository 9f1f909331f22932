"""A sparse autoencoder as plain tensors: loading (via sae-lens), encode/decode, model validation.

sae-lens is used only to read the files: its modules carry TransformerLens hook points and
training machinery we do not need on the hot path, and `import sae_lens` costs ~9 s, so it is
imported inside `load_sae` only. Everything here works on a `SaeWeights`, a frozen bundle of
tensors whose `encode` reproduces sae-lens' own `SAE.encode` for the supported architectures.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from engine.errors import SaeError, SaeIncompatibleError, UnsupportedSaeError  # noqa: F401 - re-exported
from engine.rules import hook_layer_from_name

SUPPORTED_ARCHITECTURES = ("standard", "jumprelu", "topk")
# sae-lens treats these as identity at inference time (expected_average_only_in is folded into the
# weights by from_pretrained; covariance whitening is folded at the end of training).
_IDENTITY_NORMALIZATIONS = ("none", "expected_average_only_in", "covariance_whitening")



@dataclass(frozen=True, eq=False)  # eq=False: tensors do not compare to a bool
class SaeWeights:
    architecture: str  # "standard" (ReLU), "jumprelu" or "topk", as sae-lens names them
    hook_name: str  # as in the sae-lens config, e.g. "blocks.12.hook_resid_post"
    hook_layer: int  # index of the decoder layer whose output is the SAE's input
    W_enc: torch.Tensor  # (d_in, d_sae)
    b_enc: torch.Tensor  # (d_sae,)
    W_dec: torch.Tensor  # (d_sae, d_in)
    b_dec: torch.Tensor  # (d_in,)
    threshold: torch.Tensor | None = None  # (d_sae,), jumprelu only
    k: int | None = None  # topk only
    apply_b_dec_to_input: bool = True
    rescale_acts_by_decoder_norm: bool = False  # topk option: rank pre-activations by |W_dec[i]|
    # Derived once at construction: (h - b_dec) @ W_enc + b_enc == h @ W_enc + encoder_bias.
    encoder_bias: torch.Tensor | None = None
    decoder_row_norms: torch.Tensor | None = None  # only when rescale_acts_by_decoder_norm

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedSaeError(
                f"SAE architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.architecture == "jumprelu" and self.threshold is None:
            raise UnsupportedSaeError("a jumprelu SAE needs a threshold tensor")
        if self.architecture == "topk" and (self.k is None or self.k < 1):
            raise UnsupportedSaeError("a topk SAE needs k >= 1")
        d_in, d_sae = self.W_enc.shape
        if self.W_dec.shape != (d_sae, d_in) or self.b_enc.shape != (d_sae,) or self.b_dec.shape != (d_in,):
            raise UnsupportedSaeError(
                f"inconsistent SAE tensor shapes: W_enc {tuple(self.W_enc.shape)}, "
                f"W_dec {tuple(self.W_dec.shape)}, b_enc {tuple(self.b_enc.shape)}, b_dec {tuple(self.b_dec.shape)}"
            )
        # object.__setattr__: the derived tensors are part of the frozen value, computed once here.
        if self.encoder_bias is None:
            folded = self.b_enc - (self.b_dec @ self.W_enc) * float(self.apply_b_dec_to_input)
            object.__setattr__(self, "encoder_bias", folded)
        if self.rescale_acts_by_decoder_norm and self.decoder_row_norms is None:
            object.__setattr__(self, "decoder_row_norms", self.W_dec.norm(dim=-1))

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SaeWeights:
        """A copy on another device/dtype (k and the metadata unchanged); self if nothing changes."""
        if (device is None or torch.device(device) == self.device) and (dtype is None or dtype == self.dtype):
            return self
        tensors = {
            name: getattr(self, name).to(device=device, dtype=dtype)
            for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "encoder_bias", "decoder_row_norms")
            if getattr(self, name) is not None
        }
        return replace(self, **tensors)

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Feature activations (..., d_sae) of residual activations h (..., d_in), as sae-lens computes them."""
        pre = self.pre_activations(h)
        if self.architecture == "standard":
            return pre.relu()
        if self.architecture == "jumprelu":
            return pre.relu() * (pre > self.threshold).to(pre.dtype)
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self.decoder_row_norms
        top_values, top_indices = torch.topk(pre, k=min(self.k, self.d_sae), dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, top_indices, top_values.relu())

    def pre_activations(self, h: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.encoder_bias, h.reshape(-1, self.d_in).to(self.dtype), self.W_enc).reshape(
            *h.shape[:-1], self.d_sae
        )

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction x̂ = f @ W_dec + b_dec (topk with decoder-norm rescaling divides the norms back out)."""
        if self.rescale_acts_by_decoder_norm:
            f = f / self.decoder_row_norms
        return f.to(self.dtype) @ self.W_dec + self.b_dec


def load_sae(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> SaeWeights:
    """Read an SAE saved by sae-lens (`cfg.json` + `sae_weights.safetensors`) into plain tensors."""
    from sae_lens import SAE  # ~9 s import: keep it off every path that does not load an SAE

    path = Path(path)
    if not (path / "cfg.json").is_file():
        raise UnsupportedSaeError(f"no sae-lens cfg.json in the SAE folder {path.name!r}")
    try:
        sae: Any = SAE.load_from_disk(path, device=str(device))
    except (KeyError, ValueError) as exc:  # sae-lens reports unknown architectures/configs this way
        raise UnsupportedSaeError(f"sae-lens could not load the SAE in {path.name!r} ({type(exc).__name__})") from exc
    return sae_weights_from_sae_lens(sae, dtype=dtype)


def sae_weights_from_sae_lens(sae: Any, *, dtype: torch.dtype | None = None) -> SaeWeights:
    """Plain tensors out of a loaded `sae_lens.SAE` (refusing configs whose encode we do not reproduce)."""
    cfg = sae.cfg
    architecture = cfg.architecture()
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedSaeError(
            f"SAE architecture {architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if cfg.normalize_activations not in _IDENTITY_NORMALIZATIONS:
        raise UnsupportedSaeError(f"SAE input normalization {cfg.normalize_activations!r} is not supported")
    if cfg.reshape_activations != "none":
        raise UnsupportedSaeError(f"SAE activation reshaping {cfg.reshape_activations!r} is not supported")
    hook_name = cfg.metadata.hook_name
    if not hook_name:
        raise UnsupportedSaeError("the SAE config names no hook (metadata.hook_name)")

    def plain(name: str) -> torch.Tensor:
        tensor = getattr(sae, name).detach()
        return tensor.to(dtype) if dtype is not None else tensor

    return SaeWeights(
        architecture=architecture,
        hook_name=hook_name,
        hook_layer=hook_layer_from_name(hook_name),
        W_enc=plain("W_enc"),
        b_enc=plain("b_enc"),
        W_dec=plain("W_dec"),
        b_dec=plain("b_dec"),
        threshold=plain("threshold") if architecture == "jumprelu" else None,
        k=int(cfg.k) if architecture == "topk" else None,
        apply_b_dec_to_input=bool(cfg.apply_b_dec_to_input),
        rescale_acts_by_decoder_norm=bool(getattr(cfg, "rescale_acts_by_decoder_norm", False)),
    )


_DECODER_LAYER_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder blocks (Llama/Gemma/Qwen-style first, then GPT-2 and NeoX layouts)."""
    for dotted in _DECODER_LAYER_PATHS:
        node: Any = model
        for attribute in dotted.split("."):
            node = getattr(node, attribute, None)
            if node is None:
                break
        if isinstance(node, torch.nn.ModuleList):
            return node
    raise SaeIncompatibleError(
        f"cannot find the decoder layers of {type(model).__name__} (looked for {', '.join(_DECODER_LAYER_PATHS)})"
    )


def validate_sae_for_model(sae: SaeWeights, model: torch.nn.Module) -> None:
    """Raise SaeIncompatibleError unless the SAE reads a residual stream this model has."""
    config: Any = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    hidden_size = getattr(config, "hidden_size", None)
    if hidden_size is not None and sae.d_in != hidden_size:
        raise SaeIncompatibleError(
            f"SAE d_in {sae.d_in} does not match the model's hidden size {hidden_size}"
        )
    layer_count = len(decoder_layers(model))
    if not 0 <= sae.hook_layer < layer_count:
        raise SaeIncompatibleError(
            f"SAE hook {sae.hook_name!r} is on layer {sae.hook_layer} but the model has "
            f"{layer_count} layers (0..{layer_count - 1})"
        )
