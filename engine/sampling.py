"""Sampling parameters of one request and the batched next-token choice for a whole decode batch.

Every row of a batch carries its own temperature, top_p and seed. Sampling is inverse-CDF with one
uniform number per row and step, and that number is a hash of (seed, step) computed with tensor ops:
a seeded request draws the same numbers whether it runs alone or beside 15 others, in any batch
position, with no per-row `torch.Generator` call in the hot loop. Unseeded requests get a random seed.

Logprobs are those of the model's own distribution (log-softmax of the raw logits, before temperature
and top_p), as OpenAI and vLLM report them.

logit_bias (OpenAI's): `logits'[b, v] = logits[b, v] + bias_b[v]`, bias in [-100, 100], added before the
greedy argmax and before temperature/top_p; the batch keeps every row's biases as one sparse
(row, token, value) list, applied with one `index_put` per step.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine import cpu_kernels
from engine.errors import InvalidRequestError  # noqa: F401 - re-exported: most callers know it from here
from engine.rules import LOGIT_BIAS_LIMIT, MAX_STOP_SEQUENCES, MAX_TEMPERATURE, MAX_TOP_LOGPROBS

MAX_LOGIT_BIAS = LOGIT_BIAS_LIMIT
_SEED_MASK = (1 << 63) - 1
_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: up to the model's context length
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False  # keep going past EOS until max_tokens (benchmarks; not an OpenAI field)
    # (token id, bias) pairs; a {token id: bias} mapping is accepted too. Values clamped to ±100.
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        object.__setattr__(self, "stop", tuple(stop) if stop is not None else ())
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        self.validate()

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse logit_bias token ids the loaded model does not have."""
        bad = [token for token, _ in self.logit_bias if token >= vocab_size]
        if bad:
            raise InvalidRequestError(
                param="logit_bias", message=f"logit_bias: token id {bad[0]} is outside this model's vocabulary "
                f"(0..{vocab_size - 1})"
            )

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first bad field."""
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise InvalidRequestError(param="max_tokens", message="max_tokens must be a positive integer")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise InvalidRequestError(
                param="temperature", message=f"temperature must be a number between 0 and {MAX_TEMPERATURE:g}"
            )
        if not _is_number(self.top_p) or not 0.0 <= self.top_p <= 1.0:
            raise InvalidRequestError(param="top_p", message="top_p must be a number between 0 and 1")
        if self.seed is not None and not _is_int(self.seed):
            raise InvalidRequestError(param="seed", message="seed must be an integer")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise InvalidRequestError(
                param="stop", message=f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed"
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError(param="stop", message="stop sequences must be non-empty strings")
        if not isinstance(self.logprobs, bool):
            raise InvalidRequestError(param="logprobs", message="logprobs must be a boolean")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(
                param="top_logprobs",
                message=f"top_logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}",
            )
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError(param="ignore_eos", message="ignore_eos must be a boolean")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError(
                param="top_logprobs", message="top_logprobs requires logprobs to be true"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _bias_pairs(value: object) -> tuple[tuple[int, float], ...]:
    items = value.items() if isinstance(value, dict) else (value or ())
    pairs = []
    for item in items:
        try:
            token, bias = item
        except (TypeError, ValueError):
            raise InvalidRequestError(param="logit_bias", message="logit_bias must map token ids to numbers") from None
        if isinstance(token, str) and token.isascii() and token.isdigit():
            token = int(token)
        if not _is_int(token) or token < 0 or not _is_number(bias):
            raise InvalidRequestError(
                param="logit_bias", message="logit_bias must map non-negative token ids to finite numbers"
            )
        pairs.append((token, max(-MAX_LOGIT_BIAS, min(MAX_LOGIT_BIAS, float(bias)))))
    return tuple(pairs)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def effective_seed(params: SamplingParams) -> int:
    """The seed a row samples with: the request's own, else a fresh random one."""
    return params.seed & _SEED_MASK if params.seed is not None else secrets.randbits(63)


@dataclass(frozen=True, eq=False)
class SamplingBatch:
    """The sampling parameters of a batch, stacked per row: built once each time the rows change."""

    temperature: torch.Tensor  # (B, 1) float32; 1.0 on greedy rows (never divided by 0)
    top_p: torch.Tensor  # (B, 1) float32; +inf where top_p == 1
    greedy: torch.Tensor  # (B,) bool
    seeds: torch.Tensor  # (B,) int64
    all_greedy: bool
    any_top_p: bool
    logprobs: bool  # some row wants logprobs
    top_logprobs: int  # the largest top_logprobs of any row
    bias_rows: torch.Tensor | None = None  # (N,) int64 row of each logit_bias entry; None: no row has any
    bias_tokens: torch.Tensor | None = None  # (N,) int64 token id
    bias_values: torch.Tensor | None = None  # (N,) float32 bias, added to logits[row, token]

    @classmethod
    def build(
        cls, params: Sequence[SamplingParams], seeds: Sequence[int], device: torch.device
    ) -> SamplingBatch:
        greedy = [p.greedy for p in params]
        biases = [(row, token, bias) for row, p in enumerate(params) for token, bias in p.logit_bias]
        rows, tokens, values = zip(*biases, strict=True) if biases else ((), (), ())
        return cls(
            temperature=torch.tensor(
                [[1.0 if g else p.temperature] for p, g in zip(params, greedy, strict=True)], device=device
            ),
            # top_p == 1 becomes +inf: such a row never loses a tail token to float rounding.
            top_p=torch.tensor([[p.top_p if p.top_p < 1.0 else math.inf] for p in params], device=device),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            seeds=torch.tensor(list(seeds), dtype=torch.int64, device=device),
            all_greedy=all(greedy),
            any_top_p=any(p.top_p < 1.0 and not g for p, g in zip(params, greedy, strict=True)),
            logprobs=any(p.logprobs for p in params),
            top_logprobs=max((p.top_logprobs for p in params), default=0),
            bias_rows=torch.tensor(rows, dtype=torch.int64, device=device) if biases else None,
            bias_tokens=torch.tensor(tokens, dtype=torch.int64, device=device) if biases else None,
            bias_values=torch.tensor(values, dtype=torch.float32, device=device) if biases else None,
        )


@dataclass(frozen=True)
class SampledTokens:
    token_ids: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor | None  # (B,) float32, when some row asked for them
    top_ids: torch.Tensor | None  # (B, k) int64
    top_logprobs: torch.Tensor | None  # (B, k) float32


def sample_next(logits: torch.Tensor, batch: SamplingBatch, steps: torch.Tensor) -> SampledTokens:
    """Choose one token per row from (B, V) last-position logits; `steps` (B,) counts each row's
    generated tokens so far, which with the row's seed fixes its random draw."""
    logits = logits.float()
    biased = logits
    if batch.bias_rows is not None:
        # Out of place: `logits` stays the model's own distribution, which logprobs report.
        biased = logits.index_put((batch.bias_rows, batch.bias_tokens), batch.bias_values, accumulate=True)
    greedy_ids = _greedy(biased)
    if batch.all_greedy:
        token_ids = greedy_ids
    else:
        token_ids = torch.where(batch.greedy, greedy_ids, _sample(biased, batch, steps))
    if not batch.logprobs:
        return SampledTokens(token_ids, None, None, None)
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    if batch.top_logprobs == 0:
        return SampledTokens(token_ids, chosen, None, None)
    top = logprobs.topk(batch.top_logprobs, dim=-1)
    return SampledTokens(token_ids, chosen, top.indices, top.values)


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    """Each row's most likely token (the first of equal ones): miLLM's CPU kernel once a model has loaded
    it (the same indices as torch's; its argmax took ~0.6 ms of an 8-row Q4 step), else torch's."""
    if logits.device.type == "cpu" and cpu_kernels.built():
        ids = cpu_kernels.argmax(logits)
        if ids is not None:
            return ids
    return logits.argmax(dim=-1)


def _sample(logits: torch.Tensor, batch: SamplingBatch, steps: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits / batch.temperature, dim=-1)
    if batch.any_top_p:
        # The nucleus is found in descending order but applied in vocabulary order, so a row draws
        # the same token whether or not another row in its batch made this sort happen. A stable
        # sort keeps ties in vocabulary order on every run.
        ranked, order = probs.sort(dim=-1, descending=True, stable=True)
        outside_ranked = (ranked.cumsum(dim=-1) - ranked) >= batch.top_p  # mass before it reaches top_p
        outside_ranked[:, 0] = False  # the most likely token is always kept (top_p == 0 means greedy)
        outside = torch.empty_like(outside_ranked).scatter_(1, order, outside_ranked)
        probs = probs.masked_fill(outside, 0.0)
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    # Kept strictly below the total mass, so the first cdf entry above it is always a token with
    # positive probability (never one that softmax underflowed or top_p removed).
    target = torch.minimum(
        uniform_from_seed(batch.seeds, steps).unsqueeze(1) * total,
        torch.nextafter(total, torch.zeros_like(total)),
    )
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def uniform_from_seed(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """A uniform float32 in [0, 1) per row, a pure function of (seed, step): a counter-based RNG.

    32-bit integer hashing (murmur3's finaliser) done in int64 with every product kept below 2**49,
    so no tensor op ever overflows and the result is the same on every device.
    """
    low = seeds & _M32
    high = (seeds >> 32) & _M32
    state = _fmix32(low ^ _fmix32(high ^ 0x9E3779B9))
    state = _fmix32(state ^ _mul32(steps & _M32, 0x85EBCA6B))
    state = _fmix32(state ^ 0x27D4EB2F)
    return (state >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """x * constant mod 2**32 for 0 <= x < 2**32, in 16-bit halves of the constant."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _M32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)
