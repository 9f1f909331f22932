"""Writes to the SAE catalog and its feature labels."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from django.db import transaction
from django.db.models import Max

from catalog.models import LanguageModel
from engine.rules import feature_index_problem
from millm_site.errors import ValidationFailed
from millm_site.events import event_publish_sync
from steering.models import FeatureLabel, LabelSource, SaeStatus, SparseAutoencoder


def sae_register(
    *,
    name: str,
    model: LanguageModel,
    repo_id: str,
    sae_id: str,
    layer: int,
    hook_name: str,
    d_in: int,
    d_sae: int,
    architecture: str,
    local_path: Path | str,
    residual_norm: float | None = None,
    is_demo: bool = False,
) -> SparseAutoencoder:
    """Register (or refresh) an SAE already on disk, checked against the model it reads."""
    if model.hidden_size is not None and d_in != model.hidden_size:
        raise ValidationFailed(
            f"SAE d_in {d_in} does not match {model.name}'s hidden size {model.hidden_size}",
            details={"field": "d_in"},
        )
    if model.num_layers is not None and layer >= model.num_layers:
        raise ValidationFailed(
            f"SAE layer {layer} is outside {model.name}'s {model.num_layers} layers", details={"field": "layer"}
        )
    sae, _ = SparseAutoencoder.objects.update_or_create(
        name=name,
        defaults={
            "model": model,
            "repo_id": repo_id,
            "sae_id": sae_id,
            "layer": layer,
            "hook_name": hook_name,
            "d_in": d_in,
            "d_sae": d_sae,
            "architecture": architecture,
            "local_path": str(local_path),
            "residual_norm": residual_norm,
            "status": SaeStatus.READY,
            "status_message": "",
            "is_demo": is_demo,
        },
    )
    return sae


@transaction.atomic
def feature_labels_replace(
    *,
    sae: SparseAutoencoder,
    labels: Iterable[tuple[int, str, str, float | None]],
    source: str = LabelSource.AUTO,
) -> int:
    """Replace the labels of one source with (index, label, description, max_activation) rows.

    Labels edited by hand are kept: an automatic relabel must never overwrite a person's work.
    """
    rows = _checked_label_rows(sae=sae, labels=labels)
    manual = set(sae.labels.filter(source=LabelSource.MANUAL).values_list("index", flat=True))
    sae.labels.exclude(source=LabelSource.MANUAL).delete()
    FeatureLabel.objects.bulk_create(
        [
            FeatureLabel(sae=sae, index=index, label=label[:300], description=description,
                         max_activation=max_activation, source=source)
            for index, label, description, max_activation in rows
            if index not in manual
        ],
        batch_size=1000,
    )
    return len(rows) - len(manual & {index for index, *_ in rows})


def _checked_label_rows(
    *, sae: SparseAutoencoder, labels: Iterable[tuple[int, str, str, float | None]]
) -> list[tuple[int, str, str, float | None]]:
    """The rows, refused whole on an index outside the SAE or listed twice."""
    rows = list(labels)
    bad = [index for index, *_ in rows if feature_index_problem(index, sae.d_sae) is not None]
    if bad:
        raise ValidationFailed(
            f"Feature index {bad[0]} is outside 0..{sae.d_sae - 1} for SAE {sae.name}",
            details={"field": "index", "count": len(bad)},
        )
    seen: set[int] = set()
    for index, *_ in rows:
        if index in seen:
            raise ValidationFailed(f"Feature index {index} is listed twice", details={"field": "index", "index": index})
        seen.add(index)
    return rows


@transaction.atomic
def feature_labels_import(
    *,
    sae: SparseAutoencoder,
    labels: Iterable[tuple[int, str, str, float | None]],
    source: str = LabelSource.NEURONPEDIA,
) -> int:
    """Merge imported (index, label, description, max_activation) rows into the SAE's labels.

    An import names some features: their text is replaced, every other label stays, and so does every
    statistic (max_activation, the unit of relative strengths) the file does not carry. Labels edited by
    hand are kept. Returns how many labels the import wrote.
    """
    rows = _checked_label_rows(sae=sae, labels=labels)
    existing = {label.index: label for label in sae.labels.filter(index__in=[index for index, *_ in rows])}
    updated, created = [], []
    for index, text, description, max_activation in rows:
        label = existing.get(index)
        if label is None:
            created.append(FeatureLabel(sae=sae, index=index, label=text[:300], description=description,
                                        max_activation=max_activation, source=source))
        elif label.source != LabelSource.MANUAL:
            label.label, label.description, label.source = text[:300], description, source
            if max_activation is not None:
                label.max_activation = max_activation
            updated.append(label)
    FeatureLabel.objects.bulk_update(updated, ["label", "description", "source", "max_activation"], batch_size=1000)
    FeatureLabel.objects.bulk_create(created, batch_size=1000)
    return len(updated) + len(created)


def sae_set_status(*, name: str, status: str, message: str = "", attached: bool | None = None) -> SparseAutoencoder:
    """Record an SAE's status (and, with `attached`, the desired state) and tell the live pages.

    Several SAEs of the loaded model may be attached at once; attaching one marks another model's SAEs
    detached. Every attached SAE is `desired_attached`, in `attached_order` (the first is the default SAE):
    a restarted inference process attaches them all again in that order. Re-attaching one keeps its place."""
    with transaction.atomic():
        # A write first: it takes SQLite's write lock (waiting its busy timeout) before anything is read, so
        # N inference processes recording the same attach at once queue instead of failing "database is locked"
        # (a read-then-write transaction cannot wait for a writer that committed after its read).
        SparseAutoencoder.objects.filter(name=name).update(status=status, status_message=message[:2000])
        sae = SparseAutoencoder.objects.select_for_update().get(name=name)
        if attached:
            others = SparseAutoencoder.objects.exclude(model_id=sae.model_id)
            others.filter(status=SaeStatus.ATTACHED).update(status=SaeStatus.READY)
            others.filter(desired_attached=True).update(desired_attached=False, attached_order=None)
            if not sae.desired_attached or sae.attached_order is None:
                last = (SparseAutoencoder.objects.filter(model_id=sae.model_id, desired_attached=True)
                        .exclude(pk=sae.pk).aggregate(last=Max("attached_order"))["last"])
                sae.attached_order = 0 if last is None else last + 1
            sae.desired_attached = True
        elif attached is not None:
            sae.desired_attached, sae.attached_order = False, None
        sae.status, sae.status_message = status, message[:2000]
        sae.save()
    event_publish_sync("progress", "sae_status", {"name": sae.name, "status": sae.status,
                                                  "status_message": sae.status_message, "layer": sae.layer})
    return sae


def sae_detach_all_marks() -> None:
    """After a model unload nothing is attached any more (the desired state is kept for a reload)."""
    SparseAutoencoder.objects.filter(status=SaeStatus.ATTACHED).update(status=SaeStatus.READY)
