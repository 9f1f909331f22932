"""Text embeddings from a causal LM: the masked mean of the last hidden state."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.loading import LoadedModel
from engine.sampling import InvalidRequestError

MAX_INPUTS = 2048  # OpenAI's limit per request


@dataclass(frozen=True)
class EmbeddingResult:
    embeddings: list[list[float]]  # one per input, in input order
    token_counts: list[int]

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)


def embed(
    loaded: LoadedModel,
    texts: Sequence[str | Sequence[int]],
    *,
    batch_size: int = 16,
    normalize: bool = True,
) -> EmbeddingResult:
    """Embed strings (tokenized with special tokens) or token id lists.

    normalize=True scales each vector to unit length, as OpenAI's embeddings are, so a dot product
    is a cosine similarity. Run it on the scheduler's thread (`scheduler.embed`) while generation is
    live: a forward pass must not race the decode loop's interceptors.
    """
    if isinstance(texts, str) or not texts:
        raise InvalidRequestError(param="input", message="input must be a non-empty list of strings")
    if len(texts) > MAX_INPUTS:
        raise InvalidRequestError(param="input", message=f"at most {MAX_INPUTS} inputs per request")
    ids = [_token_ids(loaded, text, i) for i, text in enumerate(texts)]
    model = loaded.model
    device = next(model.parameters()).device
    pad_id = loaded.tokenizer.pad_token_id or 0
    vectors: list[list[float]] = [[] for _ in ids]
    # Similar lengths together: less padding per batch.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(ids[i]) for i in chunk)
            input_ids = torch.tensor(
                [ids[i] + [pad_id] * (width - len(ids[i])) for i in chunk], device=device
            )
            mask = torch.tensor(
                [[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in chunk], device=device
            )
            hidden = model.base_model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
            weights = mask.unsqueeze(-1).float()
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            for i, vector in zip(chunk, pooled.tolist(), strict=True):
                vectors[i] = vector
    return EmbeddingResult(embeddings=vectors, token_counts=[len(i) for i in ids])


def _token_ids(loaded: LoadedModel, text: str | Sequence[int], index: int) -> list[int]:
    param = f"input[{index}]"
    if isinstance(text, str):
        ids = list(loaded.tokenizer(text)["input_ids"])
    elif all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < loaded.vocab_size for t in text):
        ids = list(text)
    else:
        raise InvalidRequestError(param=param, message="each input must be a string or a list of token ids")
    if not ids:
        raise InvalidRequestError(param=param, message="input must not be empty")
    if len(ids) > loaded.context_length:
        raise InvalidRequestError(
            param=param,
            message=f"input has {len(ids)} tokens; this model's maximum context length is {loaded.context_length}",
            code="context_length_exceeded",
        )
    return ids
