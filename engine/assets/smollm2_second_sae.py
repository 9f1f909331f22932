"""The demo tier's second SAE: a smaller SAE on an early layer of SmolLM2, beside the layer-15 one.

Several SAEs attach at once (docs/architecture.md); the demo shows it with a second SAE where the
features are closer to the tokens (layer 6 of 30: word pieces, punctuation, the start of a name),
which is where monitoring reads most literally, while layer 15 is the one whose features are steered.
It is built after the main demo build, into its own folder, so a cached build gains it without
retraining the first SAE (about two minutes on two cores: a forward pass through 7 of 30 blocks over
the same corpus, then a smaller SAE).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .manifest import BuiltSAE, FeatureLabel
from .sae_training import SAETrainConfig

SECOND_SAE_VERSION = 1  # bump when anything below changes what gets built
SECOND_LAYER = 6
SECOND_SAE_DIR = f"sae_layer_{SECOND_LAYER}"
SECOND_HOOK_NAME = f"blocks.{SECOND_LAYER}.hook_resid_post"
SECOND_SAE_REPO_ID = "millm/smollm2-135m-instruct-res-sae-early"
SECOND_SAE_CONFIG = SAETrainConfig(d_sae=2048, k=32, steps=400, batch_size=512, lr=3e-3, seed=0)


@dataclass(frozen=True)
class MainBuild:
    """What the main demo build (engine/assets/smollm2.py) shares with this one, handed in to avoid an import cycle."""

    residuals: Callable[[Any, Any, int], tuple]  # (model, tokenizer, layer) -> (acts, token_ids, sequence_ids, positions)
    model_repo_id: str
    context_size: int
    sink_norm_factor: float
    held_out_every: int


def read_second_sae(out_dir: Path) -> BuiltSAE | None:
    """The built second SAE when its folder is finished and of this recipe, else None."""
    folder = Path(out_dir) / SECOND_SAE_DIR
    build = folder / "build.json"
    if not build.is_file() or not (folder / "sae_weights.safetensors").is_file():
        return None
    facts = json.loads(build.read_text())
    if facts.get("version") != SECOND_SAE_VERSION:
        return None
    labels = tuple(FeatureLabel(index=x["index"], label=x["label"], description=x["description"],
                                max_activation=x.get("max_activation"))
                   for x in json.loads((folder / "feature_labels.json").read_text()))
    return BuiltSAE(repo_id=SECOND_SAE_REPO_ID, sae_id=f"layer_{SECOND_LAYER}", local_path=folder,
                    layer=SECOND_LAYER, hook_name=SECOND_HOOK_NAME, d_in=facts["d_in"], d_sae=facts["d_sae"],
                    architecture="jumprelu", labels=labels, residual_norm=facts["residual_median_norm"])


def ensure_second_sae(out_dir: Path, main: MainBuild, *, progress: bool = True) -> BuiltSAE:
    """Build `out_dir/sae_layer_6/` unless it is there (the caller holds the build lock)."""
    out_dir = Path(out_dir)
    built = read_second_sae(out_dir)
    if built is not None:
        return built
    _build_second_sae(out_dir, main, progress=progress)
    built = read_second_sae(out_dir)
    assert built is not None  # just written
    return built


def _build_second_sae(out_dir: Path, main: MainBuild, *, progress: bool) -> None:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .feature_labels import feature_statistics, label_features
    from .sae_training import evaluate_sae, save_sae_lens, train_batchtopk_sae

    torch.manual_seed(SECOND_SAE_CONFIG.seed)
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(out_dir / "model")
    model = AutoModelForCausalLM.from_pretrained(out_dir / "model", dtype=torch.float32).eval()
    acts, token_ids, sequence_ids, positions = main.residuals(model, tokenizer, SECOND_LAYER)
    del model

    norms = acts.norm(dim=-1)
    median_norm = float(norms[positions > 0].median())
    keep = (positions > 0) & (norms < main.sink_norm_factor * median_norm)
    held_out = keep & (sequence_ids % main.held_out_every == main.held_out_every - 1)
    train = keep & ~held_out
    bar = tqdm(total=SECOND_SAE_CONFIG.steps, desc=f"sae (layer {SECOND_LAYER})", disable=not progress)

    def on_step(step: int, stats: dict[str, float]) -> None:
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(fvu=f"{stats['fvu']:.3f}", dead=f"{stats['dead']:.3f}")

    weights, _scale = train_batchtopk_sae(acts[train], SECOND_SAE_CONFIG, on_step=on_step)
    bar.close()
    held = evaluate_sae(weights, acts[held_out])
    stats = feature_statistics(weights.encode, acts[keep])
    labels = label_features(stats, token_ids[keep], sequence_ids[keep],
                            lambda ids: tokenizer.decode(ids, skip_special_tokens=False))

    partial = out_dir / f"{SECOND_SAE_DIR}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    save_sae_lens(weights, partial, metadata={
        "model_name": main.model_repo_id, "hook_name": SECOND_HOOK_NAME, "hook_layer": SECOND_LAYER,
        "hook_head_index": None, "context_size": main.context_size, "prepend_bos": False,
        "dataset_path": "millm/offline-demo-corpus",
        "trained_by": f"millm demo second SAE {SECOND_SAE_VERSION} (BatchTopK k={SECOND_SAE_CONFIG.k}, saved as JumpReLU)",
    })
    save_file({"max_activation": stats.max_activation.contiguous(), "fire_frequency": stats.fire_frequency,
               "mean_when_active": stats.mean_when_active}, partial / "feature_stats.safetensors")
    (partial / "feature_labels.json").write_text(json.dumps(
        [{"index": fl.index, "label": fl.label, "description": fl.description,
          "max_activation": round(float(stats.max_activation[fl.index]), 4)} for fl in labels], indent=1))
    facts: dict[str, Any] = {
        "version": SECOND_SAE_VERSION, "layer": SECOND_LAYER, "d_in": weights.d_in, "d_sae": weights.d_sae,
        "residual_median_norm": round(median_norm, 3), "train_config": asdict(SECOND_SAE_CONFIG),
        "metrics": {"fvu_held_out": round(held.fvu, 4), "l0_held_out": round(held.l0, 2),
                    "dead_fraction": round(float((stats.max_activation <= 0).float().mean()), 4)},
        "seconds": round(time.monotonic() - started, 1),
    }
    (partial / "build.json").write_text(json.dumps(facts, indent=2))  # written last: marks the folder finished
    final = out_dir / SECOND_SAE_DIR
    shutil.rmtree(final, ignore_errors=True)
    partial.replace(final)
