"""Label SAE features automatically from the tokens that activate them most (generic, plain torch).

Given activations, the token ids they came from and an encoder, it keeps each feature's top
activating positions and turns them into a short label — the top distinct tokens, e.g.
`' Paris', ' France', ' London'` — and a description with the strongest contexts. The same pass
gives per-feature statistics (max activation, firing frequency) that the UI uses for relative
strength units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .manifest import FeatureLabel

Encoder = Callable[[Tensor], Tensor]
Decoder = Callable[[Sequence[int]], str]


@dataclass
class FeatureStats:
    max_activation: Tensor  # (d_sae,)
    fire_frequency: Tensor  # (d_sae,) share of tokens where the feature is > 0
    mean_when_active: Tensor  # (d_sae,)
    top_values: Tensor  # (d_sae, top_n), descending
    top_positions: Tensor  # (d_sae, top_n) row indices into the activations; -1 where none


@torch.no_grad()
def feature_statistics(encode: Encoder, acts: Tensor, *, top_n: int = 24, chunk: int = 4096) -> FeatureStats:
    """One pass over `acts` (N, d_in): running per-feature top-n positions and summary statistics."""
    n = acts.shape[0]
    top_values: Tensor | None = None
    top_positions: Tensor | None = None
    fired = total = None
    for start in range(0, n, chunk):
        f = encode(acts[start:start + chunk].float())  # (C, d_sae)
        count = (f > 0).sum(0)
        fired = count if fired is None else fired + count
        total = f.sum(0) if total is None else total + f.sum(0)
        vals, idx = f.T.topk(min(top_n, f.shape[0]), dim=-1)
        idx = idx + start
        if top_values is not None and top_positions is not None:
            vals, idx = torch.cat([top_values, vals], 1), torch.cat([top_positions, idx], 1)
            vals, order = vals.topk(min(top_n, vals.shape[1]), dim=-1)
            idx = idx.gather(1, order)
        top_values, top_positions = vals, idx
    assert top_values is not None and top_positions is not None and fired is not None and total is not None
    top_positions = torch.where(top_values > 0, top_positions, -1)
    return FeatureStats(
        max_activation=top_values[:, 0].clone(),
        fire_frequency=fired.float() / max(1, n),
        mean_when_active=total / fired.clamp_min(1),
        top_values=top_values,
        top_positions=top_positions,
    )


def _token_repr(text: str, limit: int = 18) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _context(decode: Decoder, token_ids: Tensor, sequence_ids: Tensor, pos: int, left: int, right: int) -> str:
    seq = sequence_ids[pos]
    lo, hi = pos, pos
    while lo > 0 and pos - lo < left and sequence_ids[lo - 1] == seq:
        lo -= 1
    while hi + 1 < len(token_ids) and hi - pos < right and sequence_ids[hi + 1] == seq:
        hi += 1
    before = decode(token_ids[lo:pos].tolist())
    here = decode([int(token_ids[pos])])
    after = decode(token_ids[pos + 1:hi + 1].tolist())
    return " ".join(f"{before}⟦{here}⟧{after}".split())  # one line: newlines and runs of spaces collapse


def label_features(
    stats: FeatureStats,
    token_ids: Tensor,
    sequence_ids: Tensor,
    decode: Decoder,
    *,
    tokens_in_label: int = 3,
    contexts_in_description: int = 3,
) -> list[FeatureLabel]:
    """A label per feature: its top distinct tokens; the description shows its strongest contexts.

    `token_ids` and `sequence_ids` are aligned with the activation rows given to
    `feature_statistics`; contexts never cross a sequence boundary.
    """
    labels: list[FeatureLabel] = []
    for index in range(stats.top_values.shape[0]):
        positions = [int(p) for p in stats.top_positions[index] if p >= 0]
        if not positions:
            labels.append(FeatureLabel(index=index, label="dead", description="Never fired on the labelling text."))
            continue
        tokens: list[str] = []
        seen: set[str] = set()
        for pos in positions:
            text = decode([int(token_ids[pos])])
            key = text.strip().lower() or text
            if key not in seen:
                seen.add(key)
                tokens.append(text)
            if len(tokens) == tokens_in_label:
                break
        contexts: list[str] = []
        for pos in positions:
            ctx = _context(decode, token_ids, sequence_ids, pos, left=8, right=2)
            if ctx not in contexts:
                contexts.append(ctx)
                if len(contexts) == contexts_in_description:
                    break
        description = (
            f"Fires on {float(stats.fire_frequency[index]) * 100:.2f}% of tokens, max activation "
            f"{float(stats.max_activation[index]):.1f}. Top contexts: " + " | ".join(contexts)
        )
        labels.append(FeatureLabel(index=index, label=", ".join(_token_repr(t) for t in tokens),
                                   description=description))
    return labels
