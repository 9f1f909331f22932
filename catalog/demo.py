"""Build the demo assets (test or demo tier) and register them in the catalog.

The builders live in the torch engine (engine.assets) and know nothing of Django; this
module is the one place that turns what they built into catalog rows.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog
from django.conf import settings
from django.db import transaction
from django.utils.text import slugify

from catalog.models import LanguageModel
from catalog.services import model_register, model_set_desired_loaded
from engine.assets.demo_calibration_recipe import demo_calibration_current
from engine.assets.manifest import BuiltSAE, DemoAssets
from millm_site.celery import app
from steering.calibration_services import calibration_status_write, sae_calibrate_run, sae_calibration
from steering.models import LabelSource, SparseAutoencoder
from steering.sae_services import feature_labels_replace, sae_register

log = structlog.get_logger("millm.demo")
DEMO_CALIBRATE_TASK = "steering.tasks.demo_calibrate"

TIER_MODEL_NAMES = {"test": "tiny-llama", "demo": "smollm2-135m-instruct"}
# The demo serves the fastest variant that keeps its SAE faithful: Q4 (miLLM's W4A8 CPU kernel, else torch's
# int4; bitsandbytes on CUDA) ran 3.8-4.6x raw fp32 generate() in a served single stream and ~5x that with 8
# streams, with the demo SAE's FVU within 0.0004 of fp32's (Q8: 3.7-3.9x, FVU +0.01; docs/benchmarks.md).
# The test tier stays fp32: its outputs are checked token for token.
TIER_QUANTIZATION = {"test": "none", "demo": "q4"}
BYTES_PER_PARAMETER = {"none": 4.0, "q8": 1.85, "q4": 1.47}  # fp32; measured on SmolLM2 (tied embeddings stay fp32)


def demo_assets_build(*, tier: str, force: bool = False, asset_dir: Path | None = None,
                      calibrate: bool = True) -> DemoAssets:
    """Build one tier's files (cached on disk unless force) without touching the catalog. `calibrate=False`
    leaves the demo tier's calibrations to `demo_calibration_run` (the test tier's build has none)."""
    root = (asset_dir or settings.DEMO_ASSETS_DIR) / tier
    if tier == "test":
        from engine.assets.tiny import build_test_tier

        return build_test_tier(root, force=force)
    if tier == "demo":
        from engine.assets.smollm2 import build_demo_tier

        with _demo_build_threads(root, force=force, calibrate=calibrate):
            return build_demo_tier(root, force=force, calibrate=calibrate)
    raise ValueError(f"unknown demo tier {tier!r} (test or demo)")


def build_threads(*, cores: int, busy_cores: float) -> int:
    """Torch threads for building the demo: the cores other processes leave idle (the server is not running
    yet), at least one. A thread that has to wait for a busy core spin-waits: on 2 cores at load ≈ 5, the
    calibration's KL pass took 3.1× the CPU time and 1.8× the wall time with 2 threads as with 1."""
    return max(1, min(cores, cores - round(busy_cores)))


@contextlib.contextmanager
def _demo_build_threads(root: Path, *, force: bool, calibrate: bool = True) -> Iterator[None]:
    # MILLM_TORCH_THREADS wins; a finished cache needs no threads (and no 0.5 s look at the machine's load).
    from engine.assets.smollm2 import read_manifest

    if not settings.TORCH_THREADS and not force and read_manifest(root) is not None and (
            not calibrate or (root / "sae" / "calibration.json").is_file()):
        yield
        return
    import psutil
    import torch

    cores = os.cpu_count() or 1
    threads = settings.TORCH_THREADS or build_threads(
        cores=cores, busy_cores=psutil.cpu_percent(interval=0.5) / 100 * cores)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@transaction.atomic
def demo_assets_register(*, assets: DemoAssets, tier: str) -> tuple[LanguageModel, SparseAutoencoder]:
    built_model, built_sae = assets.model, assets.sae
    model = model_register(
        name=TIER_MODEL_NAMES[tier],
        repo_id=built_model.repo_id,
        local_path=built_model.local_path,
        parameter_count=built_model.parameter_count,
        hidden_size=built_model.hidden_size,
        num_layers=built_model.num_layers,
        context_length=built_model.context_length,
        dtype=built_model.dtype,
        quantization=TIER_QUANTIZATION[tier],
        memory_estimate_bytes=_variant_bytes(built_model.dtype, TIER_QUANTIZATION[tier], built_model.parameter_count),
        is_demo=True,
    )
    sae = sae_register(
        name=slugify(f"{model.name}-{built_sae.sae_id}"),
        model=model,
        repo_id=built_sae.repo_id,
        sae_id=built_sae.sae_id,
        layer=built_sae.layer,
        hook_name=built_sae.hook_name,
        d_in=built_sae.d_in,
        d_sae=built_sae.d_sae,
        architecture=built_sae.architecture,
        local_path=built_sae.local_path,
        residual_norm=built_sae.residual_norm,
        is_demo=True,
    )
    feature_labels_replace(
        sae=sae,
        labels=[(fl.index, fl.label, fl.description, fl.max_activation) for fl in built_sae.labels],
        source=LabelSource.BUILTIN,
    )
    for extra in assets.extra_saes:  # more SAEs of the same model (several attach at once); `sae` stays the main one
        _register_sae(model, extra)
    return model, sae


def _register_sae(model: LanguageModel, built: BuiltSAE) -> SparseAutoencoder:
    sae = sae_register(name=slugify(f"{model.name}-{built.sae_id}"), model=model, repo_id=built.repo_id,
                       sae_id=built.sae_id, layer=built.layer, hook_name=built.hook_name, d_in=built.d_in,
                       d_sae=built.d_sae, architecture=built.architecture, local_path=built.local_path,
                       residual_norm=built.residual_norm, is_demo=True)
    feature_labels_replace(sae=sae, labels=[(fl.index, fl.label, fl.description, fl.max_activation)
                                            for fl in built.labels], source=LabelSource.BUILTIN)
    return sae


def demo_assets_ensure(*, tier: str, force: bool = False, calibrate: bool = True,
                       ) -> tuple[LanguageModel, SparseAutoencoder]:
    """Build (or reuse) a tier and register it; the registration is idempotent."""
    return demo_assets_register(assets=demo_assets_build(tier=tier, force=force, calibrate=calibrate), tier=tier)


@transaction.atomic
def demo_assets_mark_desired(*, model: LanguageModel, sae: SparseAutoencoder) -> None:
    """Make the demo model and SAE what the inference process loads and attaches when it starts."""
    model_set_desired_loaded(model=model)
    SparseAutoencoder.objects.filter(desired_attached=True).update(desired_attached=False, attached_order=None)
    SparseAutoencoder.objects.filter(pk=sae.pk).update(desired_attached=True, attached_order=0)


def catalog_is_empty() -> bool:
    return not LanguageModel.objects.exists()


def _variant_bytes(dtype: str, quantization: str, parameter_count: int) -> int:
    if quantization != "none":
        return int(BYTES_PER_PARAMETER[quantization] * parameter_count)
    return {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 4) * parameter_count


# --- the demo's calibrations, computed in the worker while the server answers ---------------------------

def demo_calibration_pending(*, tier: str) -> list[SparseAutoencoder]:
    """The tier's registered demo SAEs whose calibration is still to be computed: on the demo tier those without
    the demo recipe's calibration.json; on the test tier (its build has none) only with
    MILLM_DEMO_CALIBRATION=background."""
    root = (settings.DEMO_ASSETS_DIR / tier).resolve()
    saes = [sae for sae in SparseAutoencoder.objects.filter(is_demo=True).order_by("-desired_attached", "layer")
            if sae.local_path and Path(sae.local_path).resolve().parent == root]
    if tier == "demo":
        return [sae for sae in saes if not demo_calibration_current(Path(sae.local_path))]
    if settings.DEMO_CALIBRATION == "background":
        return [sae for sae in saes if sae_calibration(sae) is None]
    return []


def demo_calibration_request(*, tier: str) -> list[SparseAutoencoder]:
    """Queue DEMO_CALIBRATE_TASK for the tier when some of its demo SAEs await their calibration (each shows
    `queued` at GET /api/saes/{name}/calibration); returns those SAEs. The task waits in the broker until the
    worker takes it; a copy queued twice finds the work done or the build lock held, and computes nothing."""
    pending = demo_calibration_pending(tier=tier)
    if not pending:
        return []
    for sae in pending:
        calibration_status_write(sae, "queued", message="the demo's calibration runs in the background")
    try:
        app.send_task(DEMO_CALIBRATE_TASK, kwargs={"tier": tier})
    except Exception as exc:  # noqa: BLE001 - the broker's many error types all mean "not queued"
        for sae in pending:
            calibration_status_write(sae, "error", message=f"The task queue is unreachable ({type(exc).__name__})")
        raise
    return pending


def demo_calibration_run(*, tier: str) -> dict[str, Any]:
    """The body of DEMO_CALIBRATE_TASK: the tier's pending calibrations at one torch thread (the server keeps
    the other cores), with progress in each SAE's status file and `calibration_progress` events."""
    import torch

    pending = demo_calibration_pending(tier=tier)
    if not pending:
        return {"calibrated": [], "skipped": "nothing to calibrate"}
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.TORCH_THREADS or 1)
    started = time.monotonic()
    try:
        if tier != "demo":  # the generic per-SAE calibration (POST /api/saes/{name}/calibrate)
            for sae in pending:
                if sae_calibration(sae) is None:  # a copy of this task queued twice may have done it
                    sae_calibrate_run(sae=sae)
            return {"calibrated": [sae.name for sae in pending]}
        return _demo_tier_calibrate(pending, started=started)
    except Exception as exc:
        log.exception("demo_calibration_failed", tier=tier)
        message = getattr(exc, "message", None) or type(exc).__name__  # never a path
        for sae in pending:
            if sae_calibration(sae) is None:
                calibration_status_write(sae, "error", message=f"The demo calibration failed: {message}")
        raise
    finally:
        torch.set_num_threads(threads)


def _demo_tier_calibrate(pending: list[SparseAutoencoder], *, started: float) -> dict[str, Any]:
    from engine.assets.smollm2 import calibrate_demo_tier

    by_folder = {Path(sae.local_path).resolve(): sae for sae in pending}
    last = {"at": 0.0, "folder": None}

    def on_progress(folder: Path, phase: str, done: int, total: int) -> None:
        sae = by_folder.get(folder.resolve())
        # at most one status write (and event) a second, and each change of SAE at once
        if sae is None or (time.monotonic() - last["at"] < 1.0 and folder == last["folder"] and done != total):
            return
        previous = by_folder.get(last["folder"].resolve()) if last["folder"] else None
        if previous is not None and previous != sae:  # the engine calibrates one SAE after the other
            calibration_status_write(previous, "done", message="calibrated in the background")
        last.update(at=time.monotonic(), folder=folder)
        calibration_status_write(sae, "running", phase=phase, done=done, total=total)

    first = pending[0]
    calibration_status_write(first, "running", phase="loading")
    ran = calibrate_demo_tier(settings.DEMO_ASSETS_DIR / "demo", on_progress=on_progress)
    if not ran:  # another process holds the build lock and computes them
        return {"calibrated": [], "skipped": "another build holds the lock"}
    seconds = time.monotonic() - started
    for sae in pending:
        calibration_status_write(sae, "done", message=f"calibrated in the background in {seconds:.0f} s")
    return {"calibrated": [sae.name for sae in pending]}
