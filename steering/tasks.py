"""Celery tasks of the feature pages: an SAE's top-activating contexts, computed in the worker.

The worker loads the SAE's model on the CPU for the run (the web tier never holds weights) and runs
the corpus: recent history first, then the demo corpus — chats in the model's own template and plain
prose — until CORPUS_TOKENS tokens. Progress and the outcome go to the status file the page polls.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import structlog
import torch
from asgiref.sync import async_to_sync
from celery.signals import worker_process_init, worker_ready
from django.conf import settings

from catalog.demo import DEMO_CALIBRATE_TASK, demo_calibration_run
from engine.assets.demo_corpus import chat_conversations, docstring_texts, writing_texts
from engine.feature_lens import corpus_activations
from engine.loading import load_model
from engine.sae import load_sae
from millm_site.celery import app
from monitoring.models import RequestRecord
from steering.calibration_services import sae_calibrate_run
from steering.feature_contexts import (
    CORPUS_TOKENS,
    HISTORY_TEXTS,
    contexts_save,
    contexts_status,
    write_status,
)
from steering.models import SparseAutoencoder, SweepRun, SweepStatus
from steering.sweep_services import SWEEP_TASK, SweepPlan, sweep_finish

log = structlog.get_logger("millm.features")


def _corpus(tokenizer: Any) -> Iterator[str]:
    """Lazy: the stdlib docstrings (~11 s to parse) are read only when the texts before them fall short."""
    for r in RequestRecord.objects.order_by("-created_at")[:HISTORY_TEXTS]:
        if r.prompt or r.output:
            yield f"{r.prompt}{r.output}"
    for chat in chat_conversations(count=360):
        if getattr(tokenizer, "chat_template", None):
            yield tokenizer.apply_chat_template(chat, tokenize=False)
        else:
            yield "\n".join(m["content"] for m in chat)
    yield from writing_texts()
    yield from docstring_texts()


@worker_ready.connect  # --pool=threads (manage.py serve): tasks run in the worker's own process
@worker_process_init.connect  # prefork: each child process
def _warm_imports(**_kwargs: Any) -> None:
    """transformers and sae_lens take ~25 s to import: pay it while the worker idles, not in the first build."""
    threading.Thread(target=_import_heavy, name="warm-imports", daemon=True).start()


# transformers' lazy module is not thread-safe: a task that imports from it while the warm-up thread does
# failed with "cannot import name 'AutoModelForCausalLM'". A task queued before the worker starts waits here.
_HEAVY_IMPORTS = threading.Lock()


def _import_heavy() -> None:
    with _HEAVY_IMPORTS:
        try:
            importlib.import_module("transformers").AutoModelForCausalLM  # noqa: B018 - resolves the lazy import
            importlib.import_module("sae_lens")
        except Exception as exc:  # noqa: BLE001 - a failed warm-up only means the first build imports them itself
            log.warning("warm_imports_failed", error=type(exc).__name__)


@app.task(name="steering.tasks.feature_contexts_build")
def feature_contexts_build(*, sae_name: str, max_tokens: int = CORPUS_TOKENS) -> dict[str, Any]:
    """Run the corpus through the SAE's model and save every nonzero activation."""
    _import_heavy()  # after the worker's warm-up import, not beside it
    sae = SparseAutoencoder.objects.select_related("model").get(name=sae_name)
    write_status(sae, "running", total=max_tokens, message="loading the model")
    started = time.monotonic()
    try:
        if settings.TORCH_THREADS:
            torch.set_num_threads(settings.TORCH_THREADS)
        model = sae.model
        loaded = load_model(model.local_path, dtype="float32", gguf_file=model.gguf_file or None, device="cpu")
        weights = load_sae(sae.local_path, device="cpu", dtype=torch.float32)
        last = [0.0]

        def progress(done: int, total: int) -> None:
            if time.monotonic() - last[0] > 0.5:  # a status write per half second, not per text
                last[0] = time.monotonic()
                write_status(sae, "running", done=done, total=total)

        acts = corpus_activations(loaded.model, loaded.tokenizer, weights, _corpus(loaded.tokenizer),
                                  max_tokens=max_tokens, progress=progress)
        loaded.unload()
        contexts_save(sae=sae, token_text=np.array(acts.token_text, dtype=str), doc_start=acts.doc_start,
                      rows=acts.rows, features=acts.features, values=acts.values)
    except Exception as exc:
        log.exception("feature_contexts_failed", sae=sae_name)
        message = getattr(exc, "message", None) or type(exc).__name__  # engine errors say what; never a path
        write_status(sae, "error", message=f"The contexts could not be computed: {message}")
        raise
    tokens = len(acts.token_text)
    write_status(sae, "done", done=tokens, total=tokens, message=f"{tokens:,} tokens in {time.monotonic() - started:.1f} s")
    return contexts_status(sae=sae)


@app.task(name=SWEEP_TASK)
def sweep_run(sweep_id: str) -> str:
    """A large steering sweep (POST /api/steering/sweep): progress on /ws/progress/, the result in its SweepRun."""
    run = SweepRun.objects.get(pk=sweep_id)
    plan = SweepPlan(**run.request)
    SweepRun.objects.filter(pk=run.pk).update(status=SweepStatus.RUNNING)
    try:
        async_to_sync(sweep_finish)(run, plan)
    except Exception:
        log.exception("sweep_failed", sweep=sweep_id)  # sweep_finish saved the failure on the run
    return sweep_id


@app.task(name="steering.tasks.sae_calibrate")
def sae_calibrate(*, sae_name: str) -> dict[str, Any]:
    """Per-feature recommended strengths of an SAE (POST /api/saes/{name}/calibrate): steering/calibration_services."""
    _import_heavy()  # posted right after the worker starts: after its warm-up, not beside it
    sae = SparseAutoencoder.objects.select_related("model").get(name=sae_name)
    return sae_calibrate_run(sae=sae)


@app.task(name=DEMO_CALIBRATE_TASK)
def demo_calibrate(*, tier: str) -> dict[str, Any]:
    """The demo's calibrations, queued by `manage.py serve` once it serves (catalog/demo.py)."""
    _import_heavy()  # queued at the worker's start: after its warm-up, not beside it
    return demo_calibration_run(tier=tier)
