"""Per-feature calibrated strengths of an SAE: read, shown in every unit, filled into a recommended steering,
and computed for any SAE by a Celery task.

The numbers live in the SAE folder's calibration.json (engine/calibration.py): raw strengths per feature
(recommended, low, high), for the steering recipe they were measured with. The demo build writes it; for
any other SAE `POST /api/saes/{name}/calibrate` queues `steering.tasks.sae_calibrate`, which loads the
SAE's model on the worker's CPU and reports `calibration_progress` on /ws/progress/.

Units (one meaning each, steering/units.py): raw = the coefficient of the steered direction;
residual_norm = raw / the SAE's recorded residual median norm; max_activation = raw / the feature's
recorded max activation.
"""

from __future__ import annotations

import json
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import structlog
from django.conf import settings

from engine.calibration_file import CALIBRATION_FILE, CalibrationRecipe, read_calibration, write_calibration
from millm_site.celery import app
from millm_site.errors import ValidationFailed
from millm_site.events import event_publish_sync
from steering.models import SparseAutoencoder
from steering.steering_options import sae_steering_recommendation

log = structlog.get_logger("millm.calibration")
CALIBRATE_TASK = "steering.tasks.sae_calibrate"
STALE_S = 1800  # a queued/running mark older than this belongs to a worker that died


def sae_calibration(sae: SparseAutoencoder | None) -> dict[str, Any] | None:
    """The SAE's calibration.json (read once per file version), or None."""
    if sae is None or not sae.local_path:
        return None
    path = Path(sae.local_path) / CALIBRATION_FILE
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return None
    return _read(str(path.parent), stamp)


@lru_cache(maxsize=8)
def _read(folder: str, stamp: int) -> dict[str, Any] | None:
    return read_calibration(Path(folder))


def unit_factors(sae: SparseAutoencoder, max_activation: float | None) -> dict[str, float]:
    """raw strength = strength × factor, per unit this feature can be steered in."""
    factors = {"raw": 1.0}
    if sae.residual_norm:
        factors["residual_norm"] = float(sae.residual_norm)
    if max_activation:
        factors["max_activation"] = float(max_activation)
    return factors


def feature_calibration(sae: SparseAutoencoder, index: int, *, max_activation: float | None,
                        calibration: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """{"source", "recipe", "units": {unit: {"recommended", "low", "high"}}} for one feature, or None."""
    calibration = calibration if calibration is not None else sae_calibration(sae)
    if calibration is None or not 0 <= index < len(calibration["recommended"]):
        return None
    raw = {key: calibration[key][index] for key in ("recommended", "low", "high")}
    if raw["recommended"] is None:
        return None
    units = {unit: {key: _round(value / factor) for key, value in raw.items()}
             for unit, factor in unit_factors(sae, max_activation).items()}
    return {"source": calibration["source"][index], "recipe": calibration["recipe"], "units": units}


def _round(value: float) -> float:
    return float(f"{value:.4g}")


def feature_recommended_strength(sae: SparseAutoencoder | None, index: int, units: str) -> float | None:
    """This feature's recommended strength in `units`, or None when it has none (no calibration, or the unit
    needs a number the SAE does not record)."""
    if sae is None:
        return None
    label = sae.labels.filter(index=index).values_list("max_activation", flat=True).first()
    found = feature_calibration(sae, index, max_activation=label)
    return found["units"].get(units, {}).get("recommended") if found else None


def features_fill_recommended(*, sae: SparseAutoencoder | None, features: list[dict[str, Any]], units: str,
                              ) -> list[dict[str, Any]]:
    """Features whose `strength` is missing get their recommended strength in `units` (refused whole when one
    has none); the others are returned as they are."""
    missing = [f for f in features if f.get("strength") is None]
    if not missing:
        return features
    filled = []
    for feature in features:
        if feature.get("strength") is not None:
            filled.append(feature)
            continue
        index = feature.get("index")
        value = feature_recommended_strength(sae, index, units) if isinstance(index, int) else None
        if value is None:
            raise ValidationFailed(f"features.strength: feature {index} has no calibrated strength in {units} "
                                   f"units{_calibration_running(sae)}; give a strength",
                                   details={"field": "features.strength"})
        filled.append({**feature, "strength": value})
    return filled


def calibration_in_progress(sae: SparseAutoencoder | None) -> dict[str, Any] | None:
    """The status of the SAE's calibration while it is queued or running and the SAE has none yet, else None."""
    if sae is None or sae_calibration(sae) is not None:
        return None
    status = calibration_status(sae=sae)
    if status["state"] not in ("queued", "running") or time.time() - status.get("at", 0) > STALE_S:
        return None
    return status


def _calibration_running(sae: SparseAutoencoder | None) -> str:
    """' yet: ... is running (phase 40/120)' while the SAE's calibration is queued or running, else ''."""
    status = calibration_in_progress(sae)
    if status is None:
        return ""
    if status["state"] == "queued":
        return f" yet: the calibration of SAE {sae.name} is queued"
    done = f" ({status['phase']} {status['done']}/{status['total']})" if status.get("total") else ""
    return f" yet: the calibration of SAE {sae.name} is running{done}, see GET /api/saes/{sae.name}/calibration"


def slider_calibration(sae: SparseAutoencoder | None, index: int) -> dict[str, Any] | None:
    """What a steering slider needs: per unit, the factor to raw and the recommended value and useful range."""
    if sae is None:
        return None
    label = sae.labels.filter(index=index).values_list("max_activation", flat=True).first()
    factors = unit_factors(sae, label)
    found = feature_calibration(sae, index, max_activation=label)
    return {unit: {"factor": factor, **(found["units"][unit] if found else {})} for unit, factor in factors.items()}


# --- computing it -------------------------------------------------------------------------------------

def _status_path(sae: SparseAutoencoder) -> Path:
    return Path(settings.VAR_DIR) / "calibration" / f"{sae.name}.status.json"


def calibration_status(*, sae: SparseAutoencoder) -> dict[str, Any]:
    """{state: none|queued|running|done|error, phase, done, total, message}."""
    try:
        status = json.loads(_status_path(sae).read_text())
    except (OSError, ValueError):
        status = {"state": "none", "phase": "", "done": 0, "total": 0, "message": ""}
    if status["state"] in ("none", "queued", "running") and sae_calibration(sae) is not None and (
            status["state"] == "none" or time.time() - status.get("at", 0) > STALE_S):
        status["state"] = "done"
    return status


def calibration_status_write(sae: SparseAutoencoder, state: str, *, phase: str = "", done: int = 0,
                             total: int = 0, message: str = "") -> dict[str, Any]:
    """Write the SAE's status file and tell the live pages (`calibration_progress` on /ws/progress/)."""
    path = _status_path(sae)
    path.parent.mkdir(parents=True, exist_ok=True)
    status = {"state": state, "phase": phase, "done": done, "total": total, "message": message, "at": time.time()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status))
    os.replace(tmp, path)
    event_publish_sync("progress", "calibration_progress", {"sae": sae.name, **status})
    return status


def sae_calibrate_request(*, sae: SparseAutoencoder) -> dict[str, Any]:
    """Queue the calibration for the worker (once: a running one is reported, not doubled)."""
    status = calibration_status(sae=sae)
    if status["state"] in ("queued", "running") and time.time() - status.get("at", 0) < STALE_S:
        return status
    if not sae.local_path or not Path(sae.local_path).is_dir():
        raise ValidationFailed(f"SAE {sae.name} has no local files to calibrate", details={"field": "name"})
    status = calibration_status_write(sae, "queued")
    try:
        app.send_task(CALIBRATE_TASK, kwargs={"sae_name": sae.name})
    except Exception as exc:  # noqa: BLE001 - the broker's many error types all mean "not queued"
        status = calibration_status_write(sae, "error", message=f"The task queue is unreachable "
                                          f"({type(exc).__name__}); is the worker running?")
    return status


def sae_calibrate_run(*, sae: SparseAutoencoder) -> dict[str, Any]:
    """Compute and save the SAE's calibration (the Celery task's body): its model on the CPU, the KL method
    for every feature along the SAE's recommended direction (its steering.json) or its decoder rows."""
    calibration_status_write(sae, "running", phase="loading")
    started = time.monotonic()
    try:
        _calibrate(sae)
    except Exception as exc:
        # The status must not stay "running" forever; its message names the failure, never a server path.
        message = getattr(exc, "message", None) or type(exc).__name__
        calibration_status_write(sae, "error", message=f"The calibration failed: {message}")
        raise
    return calibration_status_write(sae, "done", message=f"calibrated in {time.monotonic() - started:.0f} s")


def _calibrate(sae: SparseAutoencoder) -> None:
    # Local: only the worker runs this, and the web tier never imports torch.
    import torch  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    from engine.calibration_sweep import calibrate_sae  # noqa: PLC0415
    from engine.loading import load_model  # noqa: PLC0415
    from engine.sae import load_sae  # noqa: PLC0415

    if settings.TORCH_THREADS:
        torch.set_num_threads(settings.TORCH_THREADS)
    loaded = load_model(sae.model.local_path, dtype="float32", gguf_file=sae.model.gguf_file or None, device="cpu")
    try:
        weights = load_sae(sae.local_path, device="cpu", dtype=torch.float32)
        preset = sae_steering_recommendation(sae) or {}
        concept_file = Path(sae.local_path) / "concept_directions.safetensors"
        concept = load_file(concept_file)["concept_directions"] if concept_file.is_file() else None
        direction = preset.get("direction", "decoder") if concept is not None else "decoder"
        recipe = CalibrationRecipe(direction=direction, layers=tuple(preset.get("layers") or ()) if direction ==
                                   preset.get("direction") else (), positions=preset.get("positions", "generated_only"))
        last = [0.0]

        def progress(phase: str, done: int, total: int) -> None:
            if time.monotonic() - last[0] > 1.0 or done == total:  # at most one event a second
                last[0] = time.monotonic()
                calibration_status_write(sae, "running", phase=phase, done=done, total=total)

        result = calibrate_sae(loaded=loaded, sae=weights, recipe=recipe, concept_directions=concept,
                               residual_norm=float(sae.residual_norm or 0.0) or None, progress=progress)
        write_calibration(Path(sae.local_path), recipe=recipe, residual_norm=result["residual_norm"],
                          strengths=result["strengths"], method=result["method"])
    finally:
        loaded.unload()
