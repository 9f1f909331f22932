"""The compare's token-level diff: the inference process scores the steered greedy answer against the
unsteered model (engine/token_diff.py) and reads the changed features of every attached SAE; this side adds
their labels, each from its own SAE."""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async

from inference import messages as m
from inference.client import inference_client
from steering.models import FeatureLabel, SparseAutoencoder

TOP_CHANGED_FEATURES = 10


def feature_labels(*, sae: SparseAutoencoder, indices: list[int]) -> dict[int, str]:
    return dict(FeatureLabel.objects.filter(sae=sae, index__in=indices).values_list("index", "label"))


def feature_labels_by_sae(*, model: str, wanted: dict[str, list[int]]) -> dict[tuple[str, int], str]:
    """{(SAE name, index): label} for the named SAEs of one model (each SAE labels its own features)."""
    found: dict[tuple[str, int], str] = {}
    for sae in SparseAutoencoder.objects.filter(model__name=model, name__in=list(wanted)):
        found.update({(sae.name, i): label for i, label in feature_labels(sae=sae, indices=wanted[sae.name]).items()})
    return found


async def compare_token_diff(*, sae: SparseAutoencoder, prompt: str | None, messages: list[dict[str, Any]] | None,
                             steered_ids: list[int], unsteered_ids: list[int], steering: m.Steering) -> dict[str, Any]:
    """{tokens: [{token, position, steered_logprob, unsteered_logprob, kl}], first_divergence, top_changed_features,
    saes}: the changed features are read by every attached SAE (`saes`, the default first), each SAE's largest in
    turn (engine/token_diff.py), each naming its SAE."""
    diff = await inference_client().token_diff(model=sae.model.name, call=m.TokenDiff(
        sae=sae.name, prompt=prompt, messages=messages, steered_ids=steered_ids, unsteered_ids=unsteered_ids,
        steering=steering, top_features=TOP_CHANGED_FEATURES))
    wanted: dict[str, list[int]] = {}
    for f in diff.top_changed_features:
        wanted.setdefault(f.sae or sae.name, []).append(f.index)
    labels = await sync_to_async(feature_labels_by_sae)(model=sae.model.name, wanted=wanted)
    return {"tokens": [{"token": t.token, "token_id": t.token_id, "position": t.position,
                        "steered_logprob": t.steered_logprob, "unsteered_logprob": t.unsteered_logprob, "kl": t.kl}
                       for t in diff.tokens],
            "first_divergence": diff.first_divergence,
            "saes": diff.saes or [sae.name],
            "top_changed_features": [{"sae": f.sae or sae.name, "index": f.index,
                                      "label": labels.get((f.sae or sae.name, f.index)), "before": f.before,
                                      "after": f.after, "delta": f.delta, "relative_delta": f.relative_delta}
                                     for f in diff.top_changed_features]}


def token_diff_view(diff: dict[str, Any]) -> dict[str, Any]:
    """The compare panel's token strip: each token shaded by its KL (relative to the largest, 0..100) and the
    first divergence flagged; with several SAEs reading, the changed-features table names each one's SAE."""
    largest = max((t["kl"] for t in diff["tokens"]), default=0.0) or 1.0
    tokens = [{**t, "shade": round(100 * t["kl"] / largest), "diverges": t["position"] == diff["first_divergence"]}
              for t in diff["tokens"]]
    return {**diff, "tokens": tokens, "largest_kl": largest, "several_saes": len(diff.get("saes") or ()) > 1}
