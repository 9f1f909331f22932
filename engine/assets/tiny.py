"""The test tier: a tiny Llama with its own tokenizer and an SAE with a few hand-made features.

Everything is built offline and deterministically in seconds on two CPU cores (about 8 s while the
machine was busy with other work, most of it the training run):

- a byte-level BPE trained on a generated corpus (`tiny_tokenizer`), with a ChatML template;
- a 4-layer LlamaForCausalLM (hidden 64, 236k parameters), trained for 120 small steps on that
  corpus so greedy text is word-like rather than noise;
- a "standard" (ReLU) SAE on the residual stream after block `SAE_LAYER`, in sae-lens' on-disk
  format. Most features are random directions that fire on ~5 % of tokens; the features listed in
  `FEATURE_INDICES` are built on purpose: the encoder detects one word token, the decoder row is that
  token's unembedding direction as seen from the SAE layer, so adding it makes the word appear;
- a second SAE of the same recipe after block `SAE2_LAYER` (an earlier layer), so tests attach two SAEs on
  two layers: same word features at the same indices, its own random ones.

A folder holding a complete build of the same `RECIPE_VERSION` (a digest of this module and
`tiny_tokenizer`) is reused. Nothing here imports sae-lens (its import alone takes ~10 s): the files
follow its format exactly (`cfg.json` as `SAEConfig.to_dict()` writes it, `sae_weights.safetensors`)
and the tests load them with `SAE.load_from_disk`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.assets.manifest import BuiltModel, BuiltSAE, DemoAssets, FeatureLabel
from engine.assets.tiny_tokenizer import BOS, FEATURE_WORDS

if TYPE_CHECKING:  # imported lazily: reusing a cached build needs neither torch nor transformers
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast


def _recipe_version() -> str:
    """A name plus a digest of this recipe's source: editing the builder invalidates old caches."""
    digest = hashlib.sha256()
    for module in ("tiny.py", "tiny_tokenizer.py"):
        digest.update((Path(__file__).with_name(module)).read_bytes())
    return f"tiny-test-tier/2+{digest.hexdigest()[:12]}"


RECIPE_VERSION = _recipe_version()
MODEL_REPO_ID = "millm/tiny-llama"
SAE_REPO_ID = "millm/tiny-llama-sae"
SAE_LAYER = 2
SAE_ID = f"layer_{SAE_LAYER}"
HOOK_NAME = f"blocks.{SAE_LAYER}.hook_resid_post"
D_SAE = 256
# Spread over the dictionary so code that assumes "feature 0 is special" gets caught.
FEATURE_INDICES = (7, 42, 77, 128, 190, 233)
STEERING_NORMS = 2.0  # in residual norms; 0.5 already biases the text, 2 makes the word repeat
RANDOM_FIRE_RATE = 0.05  # random features fire on about this share of corpus tokens
SEED = 1234
TRAIN_STEPS = 120  # ~6 s on one busy core; loss 6.5 -> 2.5, enough for word-like greedy text
TRAIN_BATCH = 8
TRAIN_SEQ = 32
TRAIN_LR = 1e-2
STATS_TOKENS = 8192  # corpus tokens whose residuals set the SAE's thresholds and scales
STATS_CHUNK = 128  # ... run as windows of this many tokens
CONTEXT_LENGTH = 1024

SAE2_LAYER = 1
SAE2_REPO_ID = "millm/tiny-llama-sae-early"
SAE2_ID = f"layer_{SAE2_LAYER}"

MODEL_DIR = "model"
SAE_DIR = "sae"
SAE2_DIR = "sae_early"
MANIFEST = "manifest.json"


def build_test_tier(out_dir: Path, *, force: bool = False) -> DemoAssets:
    """Build (or reuse) the test tier under out_dir: `model/`, `sae/` and `manifest.json`."""
    out_dir = Path(out_dir)
    if not force:
        cached = load_test_tier(out_dir)
        if cached is not None:
            return cached
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a crash or a concurrent build never leaves half a folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-build-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the folder from a server running as another user
    try:
        _build_into(staging)
        # A concurrent build may have finished meanwhile: keep it (same recipe, same bytes) unless forced.
        if out_dir.exists() and (force or load_test_tier(out_dir) is None):
            shutil.rmtree(out_dir)
        try:
            os.rename(staging, out_dir)
        except OSError:
            # Another process renamed its build first; use that one if it is complete.
            if load_test_tier(out_dir) is None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    assets = load_test_tier(out_dir)
    if assets is None:  # pragma: no cover - only if the folder vanished under us
        raise RuntimeError(f"test tier build in {out_dir} is incomplete")
    return assets


def load_test_tier(out_dir: Path) -> DemoAssets | None:
    """The cached build in out_dir if it is complete and of this recipe, else None (no torch import)."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest is None or manifest.get("recipe_version") != RECIPE_VERSION:
        return None
    needed = [out_dir / MODEL_DIR / n for n in ("config.json", "model.safetensors", "tokenizer.json")]
    needed += [out_dir / d / n for d in (SAE_DIR, SAE2_DIR) for n in ("cfg.json", "sae_weights.safetensors")]
    if not all(p.is_file() for p in needed):
        return None
    return _assets_from_manifest(out_dir, manifest)


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _assets_from_manifest(out_dir: Path, manifest: dict[str, Any]) -> DemoAssets:
    m = manifest["model"]
    model = BuiltModel(
        repo_id=m["repo_id"],
        local_path=out_dir / MODEL_DIR,
        parameter_count=m["parameter_count"],
        dtype=m["dtype"],
        hidden_size=m["hidden_size"],
        num_layers=m["num_layers"],
        context_length=m["context_length"],
    )

    def built(s: dict[str, Any], folder: str, features: list[dict[str, Any]], norm: float) -> BuiltSAE:
        labels = tuple(FeatureLabel(f["index"], f["label"], f["description"], max_activation=f["max_activation"])
                       for f in features)
        return BuiltSAE(repo_id=s["repo_id"], sae_id=s["sae_id"], local_path=out_dir / folder, layer=s["layer"],
                        hook_name=s["hook_name"], d_in=s["d_in"], d_sae=s["d_sae"], architecture=s["architecture"],
                        labels=labels, residual_norm=norm)

    sae = built(manifest["sae"], SAE_DIR, manifest["features"], manifest["residual_norm_median"])
    early = manifest["sae_early"]
    extra = (built(early, SAE2_DIR, early["features"], early["residual_norm_median"]),)
    return DemoAssets(model=model, sae=sae, extra_saes=extra)


def _build_into(root: Path) -> None:
    import torch

    from engine.assets import tiny_tokenizer as tt

    started = time.perf_counter()
    corpus = tt.build_corpus(seed=SEED)
    bpe = tt.train_tokenizer(corpus)
    hf_tokenizer = tt.save_tokenizer(bpe, root / MODEL_DIR)
    ids = torch.tensor(bpe.encode(corpus).ids, dtype=torch.long)

    with _build_settings():
        model = _train_model(_new_model(hf_tokenizer), ids)
        model.save_pretrained(str(root / MODEL_DIR))
        residuals, token_ids = _residuals(model, ids[:STATS_TOKENS], SAE_LAYER)
        sae_tensors, features, norm_median = _make_sae(model, hf_tokenizer, residuals, token_ids, SAE_LAYER)
        residuals2, token_ids2 = _residuals(model, ids[:STATS_TOKENS], SAE2_LAYER)
        sae2_tensors, features2, norm2 = _make_sae(model, hf_tokenizer, residuals2, token_ids2, SAE2_LAYER)
    _save_sae(root / SAE_DIR, sae_tensors, d_in=model.config.hidden_size, layer=SAE_LAYER)
    _save_sae(root / SAE2_DIR, sae2_tensors, d_in=model.config.hidden_size, layer=SAE2_LAYER)

    manifest = {
        "recipe_version": RECIPE_VERSION,
        "model": {
            "repo_id": MODEL_REPO_ID,
            "parameter_count": sum(p.numel() for p in model.parameters()),
            "dtype": "float32",
            "hidden_size": model.config.hidden_size,
            "num_layers": model.config.num_hidden_layers,
            "context_length": CONTEXT_LENGTH,
            "vocab_size": model.config.vocab_size,
        },
        "sae": {
            "repo_id": SAE_REPO_ID,
            "sae_id": SAE_ID,
            "layer": SAE_LAYER,
            "hook_name": HOOK_NAME,
            "d_in": model.config.hidden_size,
            "d_sae": D_SAE,
            "architecture": "standard",
        },
        # Median L2 norm of the residual after block SAE_LAYER on the corpus: the unit for steering
        # strengths. A labelled feature's decoder row times 0.5 of it tilts the text toward the
        # word; times 2 (the hint) the word takes over greedy output.
        "residual_norm_median": norm_median,
        "steering_strength_hint": round(STEERING_NORMS * norm_median, 2),
        "features": features,
        "sae_early": {
            "repo_id": SAE2_REPO_ID,
            "sae_id": SAE2_ID,
            "layer": SAE2_LAYER,
            "hook_name": f"blocks.{SAE2_LAYER}.hook_resid_post",
            "d_in": model.config.hidden_size,
            "d_sae": D_SAE,
            "architecture": "standard",
            "residual_norm_median": norm2,
            "features": features2,
        },
        "build_seconds": round(time.perf_counter() - started, 2),
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


@contextmanager
def _build_settings() -> Iterator[None]:
    """Fixed seed, one thread, no progress bars; the caller's RNG state and settings come back after.

    One thread gives the same bytes whatever the core count (float reductions split across threads
    round differently), and for a model this small it is also the fastest.
    """
    import torch
    from transformers.utils import logging as hf_logging

    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            yield
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()


def _new_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,  # <|im_end|>: ends a chat reply
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT_LENGTH,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        dtype="float32",
        **special,
    )
    model = LlamaForCausalLM(config)
    # Unit-scale embeddings (not Llama's 0.02): the token's own vector then stays a sizeable part of
    # the residual stream, so an SAE encoder can pick a word token out linearly at SAE_LAYER, and
    # the short training run converges faster.
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
    # Plain text ends with <|endoftext|>, chat turns with <|im_end|>: stop on either.
    endoftext = tokenizer.convert_tokens_to_ids(BOS)
    model.generation_config = GenerationConfig(
        bos_token_id=special["bos_token_id"],
        eos_token_id=[special["eos_token_id"], endoftext],
        pad_token_id=special["pad_token_id"],
        do_sample=False,
    )
    return model


def _train_model(model: LlamaForCausalLM, ids: torch.Tensor) -> LlamaForCausalLM:
    """A short AdamW run on random windows of the corpus."""
    import torch

    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=TRAIN_LR, total_steps=TRAIN_STEPS, pct_start=0.1
    )
    model.train()
    for _ in range(TRAIN_STEPS):
        starts = torch.randint(0, len(ids) - TRAIN_SEQ - 1, (TRAIN_BATCH,), generator=generator)
        batch = torch.stack([ids[s : s + TRAIN_SEQ] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return model


def _residuals(model: LlamaForCausalLM, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual after block `layer` for every corpus token (the first of each chunk dropped:
    position 0 is an outlier in most models and would skew the statistics)."""
    import torch

    captured: list[torch.Tensor] = []

    def keep(_module: Any, _args: Any, output: Any) -> None:
        captured.append((output[0] if isinstance(output, tuple) else output).detach())

    handle = model.model.layers[layer].register_forward_hook(keep)
    usable = (len(ids) // STATS_CHUNK) * STATS_CHUNK
    windows = ids[:usable].view(-1, STATS_CHUNK)
    try:
        with torch.no_grad():
            for start in range(0, len(windows), 32):
                model(input_ids=windows[start : start + 32])
    finally:
        handle.remove()
    hidden = torch.cat(captured)[:, 1:].reshape(-1, model.config.hidden_size)
    return hidden, windows[:, 1:].reshape(-1)


def _make_sae(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    residuals: torch.Tensor,
    token_ids: torch.Tensor,
    layer: int,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], float]:
    import torch

    d_in = residuals.shape[1]
    norm_median = float(residuals.norm(dim=1).median())
    mean = residuals.mean(0)
    centered = residuals - mean

    # Random features: unit decoder rows, tied encoder, bias at the (1 - rate) quantile.
    w_dec = torch.randn(D_SAE, d_in)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    w_enc = w_dec.T.clone()
    b_enc = -torch.quantile(centered @ w_enc, 1 - RANDOM_FIRE_RATE, dim=0)

    cov = centered.T @ centered / len(centered) + 1e-3 * torch.eye(d_in) * centered.var(0).mean()
    unembed = model.lm_head.weight.detach() * model.model.norm.weight.detach()
    features: list[dict[str, Any]] = []
    for index, word in zip(FEATURE_INDICES, FEATURE_WORDS, strict=True):
        token = f" {word}"
        (token_id,) = tokenizer.encode(token, add_special_tokens=False)
        on = token_ids == token_id
        # Decoder: the token's unembedding as the final norm sees it, so a large push toward it
        # survives the last blocks and makes the token the argmax.
        w_dec[index] = unembed[token_id] / unembed[token_id].norm()
        # Encoder: a linear discriminant (token vs. everything), threshold halfway between the
        # token's weakest occurrence and the strongest other token, scaled so a typical firing
        # is about one residual norm. (The encoder sees h - b_dec, i.e. `centered`.)
        direction = torch.linalg.solve(cov, centered[on].mean(0))
        proj = centered @ direction
        on_min, off_max = float(proj[on].min()), float(proj[~on].max())
        if not on_min > off_max:  # the recipe guarantees a wide margin; fail loudly if it breaks
            raise RuntimeError(f"test tier: {token!r} is not linearly separable at layer {layer}")
        threshold = (on_min + off_max) / 2
        scale = norm_median / float((proj[on] - threshold).mean())
        w_enc[:, index] = direction * scale
        b_enc[index] = -threshold * scale
        acts = torch.relu((proj - threshold) * scale)
        features.append(
            {
                "index": index,
                "token": token,
                "token_id": int(token_id),
                "label": f"token {token!r}",
                "description": f"Fires on the word token {token!r}; its decoder row pushes the model to say it.",
                # "Typical max": the 90th percentile over the word's occurrences, robust to outliers.
                "max_activation": round(float(torch.quantile(acts[on], 0.9)), 4),
                "mean_activation": round(float(acts[on].mean()), 4),
                "occurrences": int(on.sum()),
                "false_positive_rate": round(float((acts[~on] > 0).float().mean()), 6),
            }
        )
    tensors = {"W_dec": w_dec, "W_enc": w_enc.contiguous(), "b_dec": mean, "b_enc": b_enc}
    return tensors, features, round(norm_median, 4)


def _save_sae(path: Path, tensors: dict[str, torch.Tensor], *, d_in: int, layer: int) -> None:
    """Write sae-lens' on-disk format: what `StandardSAE(cfg).save_model(path)` writes."""
    from importlib.metadata import PackageNotFoundError, version

    from safetensors.torch import save_file

    try:
        sae_lens_version = version("sae-lens")
    except PackageNotFoundError:  # the format is that of 6.x; loaders only check the major
        sae_lens_version = "6.54.12"
    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous().float() for k, v in sorted(tensors.items())}, str(path / "sae_weights.safetensors")
    )
    cfg = {
        "d_in": d_in,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": sae_lens_version,
            "sae_lens_training_version": sae_lens_version,
            "model_name": MODEL_REPO_ID,
            "hook_name": f"blocks.{layer}.hook_resid_post",
            "hook_head_index": None,
            "prepend_bos": False,
            "context_size": STATS_CHUNK,
            "dataset_path": None,  # a generated corpus (tiny_tokenizer.build_corpus), not a hub dataset
            "model_class_name": "LlamaForCausalLM",
        },
        "architecture": "standard",
    }
    (path / "cfg.json").write_text(json.dumps(cfg))
