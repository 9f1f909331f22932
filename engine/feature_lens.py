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
                       max_tokens: int, max_text_tokens: int = 128,
                       progress: Callable[[int, int], None] | None = None) -> CorpusActivations:
    """Run each text (cut to `max_text_tokens`) until `max_tokens` are seen; keep every nonzero activation."""
    captured: list[torch.Tensor] = []

    def keep(_module: Any, _args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    layer = decoder_layers(model)[sae.hook_layer]
    handle = layer.register_forward_hook(keep)
    device = next(model.parameters()).device
    token_text: list[str] = []
    starts, rows, feats, vals = [0], [], [], []
    try:
        for text in texts:
            if len(token_text) >= max_tokens:
                break
            ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_text_tokens)["input_ids"]
            ids = ids[: max_tokens - len(token_text)]
            if not ids:
                continue
            captured.clear()
            model(input_ids=torch.tensor([ids], device=device))
            acts = sae.encode(captured[0][0].to(sae.device, sae.dtype)).float()  # [T, d_sae]
            token_index, feature = torch.nonzero(acts > 0, as_tuple=True)
            rows.append((token_index + len(token_text)).cpu().numpy())
            feats.append(feature.to(torch.int32).cpu().numpy())
            vals.append(acts[token_index, feature].cpu().numpy())
            token_text.extend(tokenizer.decode([i]) for i in ids)
            starts.append(len(token_text))
            if progress is not None:
                progress(len(token_text), max_tokens)
    finally:
        handle.remove()

    def joined(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    return CorpusActivations(token_text=token_text, doc_start=np.array(starts, np.int64), rows=joined(rows, np.int64),
                             features=joined(feats, np.int32), values=joined(vals, np.float32))
