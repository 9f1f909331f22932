"""Text embeddings from a causal LM: the masked mean of the last hidden state."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

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
    max_total_tokens: int | None = None,
) -> EmbeddingResult:
    """Embed strings (tokenized with special tokens) or token id lists, in one go.

    normalize=True scales each vector to unit length, as OpenAI's embeddings are, so a dot product
    is a cosine similarity. While generation is live use `scheduler.embed`, which runs the same work
    as an EmbeddingJob in bounded pieces between decode steps.
    """
    job = EmbeddingJob(loaded, texts, normalize=normalize, max_total_tokens=max_total_tokens)
    while not job.done:
        job.run_piece(batch_tokens=None, batch_size=batch_size)
    return job.result()


class EmbeddingJob:
    """One embeddings request cut into pieces of at most `budget` tokens each.

    Short inputs are batched (similar lengths together: less padding); an input longer than the
    budget runs in chunks over its own KV cache, summing the hidden states it sees, so no piece
    holds the model for longer than a budget's worth of tokens (a decode step can run between
    pieces). Construct it off the model's thread: tokenizing a long input is slow.
    """

    def __init__(self, loaded: LoadedModel, texts: Sequence[str | Sequence[int]], *, normalize: bool = True,
                 max_total_tokens: int | None = None) -> None:
        if isinstance(texts, str) or not texts:
            raise InvalidRequestError(param="input", message="input must be a non-empty list of strings")
        if len(texts) > MAX_INPUTS:
            raise InvalidRequestError(param="input", message=f"at most {MAX_INPUTS} inputs per request")
        self.loaded = loaded
        self.normalize = normalize
        self.ids = [_token_ids(loaded, text, i) for i, text in enumerate(texts)]
        total = sum(len(i) for i in self.ids)
        if max_total_tokens is not None and total > max_total_tokens:
            raise InvalidRequestError(
                param="input",
                message=f"the inputs have {total} tokens together; at most {max_total_tokens} per request",
                code="context_length_exceeded",
            )
        self.vectors: list[list[float]] = [[] for _ in self.ids]
        self._todo = sorted(range(len(self.ids)), key=lambda i: len(self.ids[i]))  # shortest first
        self._long: tuple[int, int, Any, torch.Tensor] | None = None  # (input, next position, cache, sum)
        self.cancelled = False

    @property
    def done(self) -> bool:
        return not self._todo and self._long is None

    def result(self) -> EmbeddingResult:
        return EmbeddingResult(embeddings=self.vectors, token_counts=[len(i) for i in self.ids])

    def run_piece(self, *, batch_tokens: int | None, batch_size: int = 16) -> int:
        """Run one piece (at most batch_tokens tokens; None: no bound); returns the tokens it ran."""
        model = self.loaded.model
        device = next(model.parameters()).device
        with torch.inference_mode():
            if self._long is None and self._todo and batch_tokens is not None \
                    and len(self.ids[self._todo[0]]) > batch_tokens:
                self._long = (self._todo.pop(0), 0, DynamicCache(config=model.config), None)
            if self._long is not None:
                return self._long_piece(model, device, batch_tokens or len(self.ids[self._long[0]]))
            chunk = [self._todo.pop(0)]
            while self._todo and len(chunk) < batch_size:
                width = len(self.ids[self._todo[0]])  # sorted: the next one is the widest so far
                if batch_tokens is not None and width * (len(chunk) + 1) > batch_tokens:
                    break
                chunk.append(self._todo.pop(0))
            ids = self.ids
            pad_id = self.loaded.tokenizer.pad_token_id or 0
            width = max(len(ids[i]) for i in chunk)
            input_ids = torch.tensor([ids[i] + [pad_id] * (width - len(ids[i])) for i in chunk], device=device)
            mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in chunk], device=device)
            hidden = model.base_model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
            weights = mask.unsqueeze(-1).float()
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
            for i, vector in zip(chunk, self._finish(pooled).tolist(), strict=True):
                self.vectors[i] = vector
            return width * len(chunk)

    def _long_piece(self, model: Any, device: torch.device, budget: int) -> int:
        index, start, cache, total = self._long
        ids = self.ids[index]
        piece = ids[start : start + budget]
        input_ids = torch.tensor([piece], device=device)
        positions = torch.arange(start, start + len(piece), device=device).unsqueeze(0)
        hidden = model.base_model(input_ids=input_ids, position_ids=positions, past_key_values=cache,
                                  use_cache=True).last_hidden_state.float()
        summed = hidden[0].sum(dim=0)
        total = summed if total is None else total + summed
        start += len(piece)
        if start < len(ids):
            self._long = (index, start, cache, total)
        else:
            self._long = None
            self.vectors[index] = self._finish((total / len(ids)).unsqueeze(0))[0].tolist()
        return len(piece)

    def _finish(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


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
