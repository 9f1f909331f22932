"""What one SAE feature writes to the output, and where it fires in a corpus.

- Logit lens: the feature's decoder row read through the unembedding, `logits_i = (W_dec[i] ⊙ g) @ W_U`,
  where W_U = lm_head.weight.T (d_in × vocab) and g the final RMSNorm gain when the model has one (the
  norm scales every direction before the head). The largest entries are the tokens it promotes, the
  smallest those it suppresses.
- Corpus activations: the hooked layer's output for each text, encoded by the SAE; only the nonzero
  activations are kept (sparse: token, feature, value), so a page can read any feature's top contexts
  and the activations around them without the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.sae import SaeWeights, decoder_layers


@dataclass(frozen=True)
class TokenLogit:
    token_id: int
    text: str
    logit: float


def unembedding_with_gain(model: torch.nn.Module) -> torch.Tensor:
    """(vocab, d_in) float32: the output head with the final norm's gain folded in, when there is one."""
    head = model.get_output_embeddings().weight.detach().float()  # [vocab, d_in]
    norm = getattr(getattr(model, "model", None), "norm", None)
    gain = getattr(norm, "weight", None)
    return head * gain.detach().float() if gain is not None and gain.shape[-1] == head.shape[-1] else head


def feature_logits(w_dec_row: torch.Tensor, unembedding: torch.Tensor, tokenizer: Any,
                   *, count: int = 10) -> tuple[list[TokenLogit], list[TokenLogit]]:
    """(promoted, suppressed): the `count` tokens with the largest and smallest `W_dec[i] @ W_U`."""
    logits = unembedding @ w_dec_row.to(unembedding.device, torch.float32)  # [vocab]
    count = min(count, logits.shape[0])
    top, bottom = torch.topk(logits, count), torch.topk(-logits, count)

    def rows(ids: torch.Tensor, values: torch.Tensor) -> list[TokenLogit]:
        return [TokenLogit(int(i), tokenizer.decode([int(i)]), float(v)) for i, v in zip(ids.tolist(), values.tolist(),
                                                                                        strict=True)]

    return rows(top.indices, top.values), rows(bottom.indices, -bottom.values)


@dataclass(frozen=True)
class CorpusActivations:
    """Sparse SAE activations over a tokenized corpus (N tokens, nnz nonzero activations)."""

    token_text: list[str]  # N decoded tokens
    doc_start: np.ndarray  # [docs + 1] int64, token offsets of each text
    rows: np.ndarray  # [nnz] int64, token index
    features: np.ndarray  # [nnz] int32
    values: np.ndarray  # [nnz] float32


@torch.no_grad()
def corpus_activations(model: torch.nn.Module, tokenizer: Any, sae: SaeWeights, texts: Iterable[str], *,
                       max_tokens: int, max_text_tokens: int = 128, batch_tokens: int = 4096,
                       progress: Callable[[int, int], None] | None = None) -> CorpusActivations:
    """Run each text (cut to `max_text_tokens`) until `max_tokens` are seen; keep every nonzero activation.

    `texts` is read lazily, only as far as the token budget needs; a text whose tokens repeat an earlier
    one's is skipped (the same context twice says nothing new). The texts run in batches of about
    `batch_tokens` (right-padded, with an attention mask: under causal attention a real token never sees
    the padding after it), sorted by length so little padding is computed.
    """
    docs: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    total = 0
    for text in texts:
        if total >= max_tokens:
            break
        ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_text_tokens)["input_ids"]
        ids = ids[: max_tokens - total]
        if not ids or tuple(ids) in seen:
            continue
        seen.add(tuple(ids))
        docs.append(ids)
        total += len(ids)
    starts = np.zeros(len(docs) + 1, np.int64)
    starts[1:] = np.cumsum([len(ids) for ids in docs])

    captured: list[torch.Tensor] = []

    def keep(_module: Any, _args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    layer = decoder_layers(model)[sae.hook_layer]
    handle = layer.register_forward_hook(keep)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(docs)), key=lambda d: len(docs[d]))
    rows, feats, vals = [], [], []
    done = 0
    try:
        i = 0
        while i < len(order):
            j = i + 1  # sorted ascending: the batch's last text is its longest
            while j < len(order) and (j + 1 - i) * len(docs[order[j]]) <= batch_tokens:
                j += 1
            batch = order[i:j]
            longest = len(docs[batch[-1]])
            ids = torch.full((len(batch), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for b, d in enumerate(batch):
                ids[b, : len(docs[d])] = torch.tensor(docs[d])
                mask[b, : len(docs[d])] = 1
            captured.clear()
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
            real = mask.bool().to(captured[0].device)
            acts = sae.encode(captured[0][real].to(sae.device, sae.dtype)).float()  # [real tokens, d_sae]
            # Each real token's corpus row: its text's offset plus its position in the text.
            offsets = torch.tensor([int(starts[d]) for d in batch]).unsqueeze(1) + torch.arange(longest)
            token_rows = offsets[mask.bool()].to(acts.device)
            token_index, feature = torch.nonzero(acts > 0, as_tuple=True)
            rows.append(token_rows[token_index].cpu().numpy())
            feats.append(feature.to(torch.int32).cpu().numpy())
            vals.append(acts[token_index, feature].cpu().numpy())
            done += int(mask.sum())
            if progress is not None:
                progress(done, max_tokens)
            i = j
    finally:
        handle.remove()

    vocab_text: dict[int, str] = {}  # one decode per distinct token, not per position
    token_text = [vocab_text.get(t) or vocab_text.setdefault(t, tokenizer.decode([t])) for ids in docs for t in ids]

    def joined(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    found = joined(rows, np.int64)
    by_row = np.argsort(found, kind="stable")  # corpus order, as the text was read
    return CorpusActivations(token_text=token_text, doc_start=starts, rows=found[by_row],
                             features=joined(feats, np.int32)[by_row], values=joined(vals, np.float32)[by_row])
