"""How closely each quantization keeps the demo model: the demo SAE's FVU and next-token agreement with float32.

    .venv/bin/python bench/quantized_fidelity.py                    # none, q4, q8 on var/assets/demo
    .venv/bin/python bench/quantized_fidelity.py --quantizations q4 --assets var/assets/demo

On text the SAE never saw (the chat turn and prose `tests/engine/test_smollm2_assets.py` holds out),
per quantization: the FVU of the demo SAE on its layer's residuals (attention sinks cut as the asset
build does; issue 14's bound is float32's + 0.02), and against float32's logits at every position the
mean KL divergence KL(float32 ‖ quantized) in nats and how often the most likely next token is the same.
One torch thread, as the inference process runs the kernels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from engine.assets.smollm2 import read_manifest  # noqa: E402
from engine.loading import LoadedModel, load_model  # noqa: E402
from engine.sae import decoder_layers, load_sae  # noqa: E402
from tests.engine.test_smollm2_assets import NEW_TEXTS  # noqa: E402


def read_text(loaded: LoadedModel, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(residuals of `layer` without each text's first position, logits at every position)."""
    residuals, logits = [], []
    handle = decoder_layers(loaded.model)[layer].register_forward_hook(
        lambda m, i, o: residuals.append((o[0] if isinstance(o, tuple) else o)[0, 1:].float()))
    try:
        with torch.inference_mode():
            for item in NEW_TEXTS:
                text = item if isinstance(item, str) else loaded.tokenizer.apply_chat_template(item, tokenize=False)
                ids = torch.tensor([loaded.tokenizer(text)["input_ids"]])
                logits.append(loaded.model(ids).logits[0].float())
    finally:
        handle.remove()
    return torch.cat(residuals), torch.cat(logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, default=ROOT / "var" / "assets" / "demo")
    parser.add_argument("--quantizations", nargs="+", default=["none", "q4", "q8"], choices=["none", "q4", "q8"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    manifest = read_manifest(args.assets)
    layer, cutoff = manifest["sae"]["layer"], manifest["sink_norm_cutoff"]
    sae = load_sae(str(args.assets / "sae"))
    reference = None
    print(f"demo SAE at layer {layer}; {len(NEW_TEXTS)} held-out texts")
    print(f"{'quant':5} {'FVU':>7} {'KL vs fp32':>11} {'top-1 same':>11}  kernel")
    for quantization in ["none", *[q for q in args.quantizations if q != "none"]]:
        loaded = load_model(str(args.assets / "model"), quantization=None if quantization == "none" else quantization)
        residuals, logits = read_text(loaded, layer)
        if reference is None:
            reference = logits
        residuals = residuals[residuals.norm(dim=-1) < cutoff]
        with torch.inference_mode():
            fvu = float((sae.decode(sae.encode(residuals)) - residuals).pow(2).sum()
                        / (residuals - residuals.mean(0)).pow(2).sum())
        p, q = reference.log_softmax(-1), logits.log_softmax(-1)
        kl = float((p.exp() * (p - q)).sum(-1).mean())
        same = float((reference.argmax(-1) == logits.argmax(-1)).float().mean())
        if quantization in args.quantizations:
            print(f"{quantization:5} {fvu:7.4f} {kl:11.4f} {same:10.1%}  {loaded.kernel}")


if __name__ == "__main__":
    main()
