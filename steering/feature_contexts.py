"""Top-activating contexts of every feature of an SAE, computed once per SAE over a local corpus.

The Celery worker (steering/tasks.py) loads the SAE's model on the CPU, runs a local corpus and keeps
every nonzero activation (engine.feature_lens.corpus_activations) in `VAR_DIR/feature_contexts/<sae>.npz`.
A page then reads any feature's contexts, density and histogram from that file, without the model.
Progress is a small JSON file beside it, which the feature page polls while the build runs.
"""

from __future__ import annotations

import json
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from django.conf import settings

from millm_site.celery import app
from steering.models import SparseAutoencoder

log = structlog.get_logger("millm.features")
CORPUS_TOKENS = 40_000  # the demo SAE's model runs this in about a minute on two CPU cores
HISTORY_TEXTS = 200  # the most recent requests go first: the texts this server really sees
BEFORE, AFTER = 10, 4  # tokens shown around a context's strongest token
HISTOGRAM_BINS = 20
BUILD_TASK = "steering.tasks.feature_contexts_build"


def _folder() -> Path:
    return Path(settings.VAR_DIR) / "feature_contexts"


def data_path(sae: SparseAutoencoder) -> Path:
    return _folder() / f"{sae.name}.npz"


def _status_path(sae: SparseAutoencoder) -> Path:
    return _folder() / f"{sae.name}.status.json"


def contexts_status(*, sae: SparseAutoencoder) -> dict[str, Any]:
    """{state: none|queued|running|done|error, done, total, message}."""
    path = _status_path(sae)
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        status = {"state": "none", "done": 0, "total": 0, "message": ""}
    if status["state"] == "none" and data_path(sae).is_file():
        status["state"] = "done"
    return status


def write_status(sae: SparseAutoencoder, state: str, *, done: int = 0, total: int = 0, message: str = "") -> None:
    _folder().mkdir(parents=True, exist_ok=True)
    tmp = _status_path(sae).with_suffix(".tmp")
    tmp.write_text(json.dumps({"state": state, "done": done, "total": total, "message": message, "at": time.time()}))
    os.replace(tmp, _status_path(sae))


def contexts_request(*, sae: SparseAutoencoder) -> dict[str, Any]:
    """Queue the build for the worker; an unreachable broker is a clear error, not a queued ghost."""
    status = contexts_status(sae=sae)
    if status["state"] in ("queued", "running") and time.time() - status.get("at", 0) < 600:
        return status
    write_status(sae, "queued", total=CORPUS_TOKENS)
    try:
        app.send_task(BUILD_TASK, kwargs={"sae_name": sae.name})
    except Exception as exc:  # noqa: BLE001 - the broker's many error types all mean "not queued"
        write_status(sae, "error", message=f"The task queue is unreachable ({type(exc).__name__}); is the worker running?")
    return contexts_status(sae=sae)


def contexts_save(*, sae: SparseAutoencoder, **arrays: np.ndarray) -> None:
    """Write the arrays atomically: a page never reads a half-written file."""
    tmp = data_path(sae).with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, data_path(sae))


@lru_cache(maxsize=2)
def _load(path: str, mtime: float) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        loaded = {key: data[key] for key in data.files}
    order = np.argsort(loaded["features"], kind="stable")  # grouped by feature: one feature is a slice
    for key in ("rows", "features", "values"):
        loaded[key] = loaded[key][order]
    loaded["feature_start"] = np.searchsorted(loaded["features"], np.arange(int(loaded["features"].max(initial=-1)) + 2))
    return loaded


def feature_corpus_facts(*, sae: SparseAutoencoder, index: int, count: int = 10) -> dict[str, Any] | None:
    """One feature's top contexts (each token with its activation), density and histogram; None before a build."""
    path = data_path(sae)
    if not path.is_file():
        return None
    data = _load(str(path), path.stat().st_mtime)
    tokens = data["token_text"]
    starts = data["feature_start"]
    lo, hi = (int(starts[index]), int(starts[index + 1])) if index + 1 < len(starts) else (0, 0)
    rows, values = data["rows"][lo:hi], data["values"][lo:hi]
    facts: dict[str, Any] = {"tokens": len(tokens), "fired": int(len(rows)), "density": len(rows) / max(1, len(tokens)),
                             "contexts": [], "histogram": []}
    if not len(rows):
        return facts
    by_token = dict(zip(rows.tolist(), values.tolist(), strict=True))
    doc_start = data["doc_start"]
    peak = float(values.max())
    chosen: list[tuple[int, int, int]] = []
    shown: set[tuple[str, ...]] = set()
    for row in rows[np.argsort(-values, kind="stable")].tolist():
        if len(chosen) == count:
            break
        doc = int(np.searchsorted(doc_start, row, side="right") - 1)
        if any(abs(row - other) <= BEFORE and d == doc for other, _, d in chosen):
            continue  # one context per stretch of text, not the same sentence ten times
        first, last = max(int(doc_start[doc]), row - BEFORE), min(int(doc_start[doc + 1]), row + AFTER + 1)
        window = tuple(tokens[first:last].tolist())
        if window in shown:
            continue  # chats share their system prompt: the same words from another text say nothing new
        shown.add(window)
        chosen.append((row, first, doc))
    for row, first, doc in chosen:
        last = min(int(doc_start[doc + 1]), row + AFTER + 1)
        facts["contexts"].append({
            "value": by_token[row],
            "tokens": [{"text": str(tokens[t]), "value": by_token.get(t, 0.0), "peak": t == row,
                        "shade": round(min(1.0, by_token.get(t, 0.0) / peak), 2)} for t in range(first, last)],
        })
    counts, edges = np.histogram(values, bins=HISTOGRAM_BINS, range=(0.0, peak))
    tallest = int(counts.max())
    facts["histogram"] = [{"from": float(edges[i]), "to": float(edges[i + 1]), "count": int(c),
                           "height": round(100 * int(c) / tallest, 1)} for i, c in enumerate(counts)]
    return facts
