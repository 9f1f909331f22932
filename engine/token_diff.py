"""Token-level diff of a steered generation against the unsteered model, by teacher forcing.

Given the prompt ids P (length p) and a generated continuation g_0..g_{n-1}, one forward pass over
P + g scores every generated token at once: the logits at input column p-1+j are the next-token
distribution that produced g_j. Per generated token j of the steered run:

    steered_logprob[j]   = log p_s(g_j | P, g_<j)        (the model with the request's steering)
    unsteered_logprob[j] = log p_u(g_j | P, g_<j)        (the plain model)
    kl[j]                = KL(p_s || p_u) = Σ_v p_s(v) (log p_s(v) - log p_u(v))   at that position

Steered scoring applies exactly the steering the generation used: the rows carry the same
CompiledSteering through the model's interceptors (the SAE hook, the layer hook), with the same
generated mask the scheduler builds (a column is "generated" where its input token was generated), so
at temperature 0 each steered token is the arg-max of its steered distribution.

Features: the residual at each reading SAE's hook layer is read *before* steering (a forward hook prepended to
the SAE hook) on unsteered rows, at the columns of the generated tokens p..p+n-1, and encoded by that
SAE. A text's feature profile is the mean over its generated tokens (documented choice: one number
per feature and text, comparable between texts of different lengths): delta_i = mean(steered text) -
mean(unsteered text), in the SAE's own activation units.

Several SAEs (every attached one reads): their activations are on different scales (residual norms grow with
depth, decoder norms and dictionary sizes differ), so raw |delta| across SAEs compares nothing. The list
interleaves the SAEs: each SAE's changes are ranked by |delta| within it, the list takes every SAE's 1st, then
every SAE's 2nd, ..., and within one such tier orders them by the *relative* change
    relative_delta_i = delta_i / a_S,   a_S = mean of SAE S's firing (> 0) activations over both texts' generated tokens
(a_S: what a firing feature of S typically reads on these texts; silent to a typical firing is 1 whichever SAE).
Why interleave rather than rank by relative_delta alone: on the demo (layer 15 and layer 6 SAEs, one feature of
each steered with the preset) the layer-6 SAE's best relative change (0.25) was below the layer-15 SAE's tenth,
so a pure relative ranking listed one SAE only; interleaving shows what each SAE saw change, scale-free.
a_S comes from the two texts themselves, not from the running statistics, so the same compare gives the same
list. With one SAE the list is ranked by |delta| exactly as before.

The same scoring gives the sweep its fluency (mean unsteered log-probability of a steered text) and its
concept score (a feature's mean activation over the steered text). Run it on the scheduler's loop
thread (`scheduler.call`), between forward passes. No Django here.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.chat import build_chat_prompt
from engine.interceptors import ForwardContext, ForwardInterceptor, RowInfo
from engine.sae import SaeWeights, decoder_layers

# Rows × columns × vocabulary floats one scoring forward may hold in logits (≈ 256 MiB in float32):
# the sweep scores many texts, so they go in row chunks under this budget.
LOGIT_BUDGET = 64 * 2**20


@dataclass(frozen=True)
class ScoringRow:
    prompt_ids: Sequence[int]
    generated_ids: Sequence[int]
    steering: Any | None = None  # a CompiledSteering, applied exactly as the generation applied it
    conditions: Any | None = None  # its CompiledConditions (conditional features), when it has any


@dataclass(frozen=True)
class ScoredRow:
    logprobs: torch.Tensor  # (n,) float32: log p(g_j | P, g_<j)
    log_distributions: torch.Tensor | None  # (n, V) float32 log-softmax at each scoring column, when kept
    features: torch.Tensor | None  # (n, d_sae) float32: SAE features of the generated tokens, before steering
    # Several reading SAEs: each one's (n, d_sae_S) features in the order given (`features` is the first's).
    all_features: tuple[torch.Tensor, ...] = ()

    @property
    def mean_logprob(self) -> float | None:
        return float(self.logprobs.mean()) if self.logprobs.numel() else None


@dataclass(frozen=True)
class TokenScore:
    token_id: int
    position: int  # index among the generated tokens (0 = the first generated token)
    steered_logprob: float
    unsteered_logprob: float
    kl: float  # KL(steered || unsteered) of the next-token distributions that produced this token


@dataclass(frozen=True)
class FeatureChange:
    index: int
    before: float  # mean activation over the unsteered text's generated tokens
    after: float  # mean activation over the steered text's generated tokens
    delta: float  # after - before
    sae: str | None = None  # the SAE the feature belongs to (None: the one `sae` given)
    relative_delta: float | None = None  # delta / a_S: the order within a tier across SAEs (module docstring)


@dataclass(frozen=True)
class TokenDiff:
    tokens: list[TokenScore]
    first_divergence: int | None  # first generated position where the two greedy outputs differ; None: equal
    top_changed_features: list[FeatureChange]


def prompt_token_ids(tokenizer: Any, prompt: str | None, messages: Sequence[Mapping[str, Any]] | None) -> list[int]:
    """The prompt ids exactly as a generation tokenizes them (chat template for messages)."""
    if messages is not None:
        return list(build_chat_prompt(tokenizer, messages).token_ids)
    return list(tokenizer(prompt or "")["input_ids"])


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension, from log-probabilities; 0·log 0 counts as 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """First index where the sequences differ (a prefix differs where the shorter one ends); None if equal."""
    for position, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return position
    return None if len(a) == len(b) else min(len(a), len(b))


def score_rows(model: torch.nn.Module, interceptors: Sequence[ForwardInterceptor], rows: Sequence[ScoringRow], *,
               pad_id: int, sae: SaeWeights | None = None, keep_distributions: bool = False) -> list[ScoredRow]:
    """Teacher-force every row (prompt + its generated ids) in batched forwards (row chunks within
    LOGIT_BUDGET); `sae` set: also the features of each row's generated tokens, read before steering."""
    vocab = model.get_output_embeddings().weight.shape[0]
    scored: list[ScoredRow] = []
    start = 0
    while start < len(rows):
        end = start + 1
        width = len(rows[start].prompt_ids) + len(rows[start].generated_ids)
        while end < len(rows):
            wider = max(width, len(rows[end].prompt_ids) + len(rows[end].generated_ids))
            if (end - start + 1) * wider * vocab > LOGIT_BUDGET:
                break
            width, end = wider, end + 1
        scored.extend(_score_chunk(model, interceptors, rows[start:end], pad_id=pad_id,
                                   saes=(sae,) if sae is not None else (), keep_distributions=keep_distributions))
        start = end
    return scored


def _score_chunk(model: torch.nn.Module, interceptors: Sequence[ForwardInterceptor], rows: Sequence[ScoringRow], *,
                 pad_id: int, saes: Sequence[SaeWeights] = (), keep_distributions: bool) -> list[ScoredRow]:
    device = next(model.parameters()).device
    lengths = [len(r.prompt_ids) + len(r.generated_ids) for r in rows]
    width = max(lengths)
    pads = [width - length for length in lengths]
    # Left-padded, as the scheduler's prefill pads, with the same position ids and masks.
    input_ids = torch.tensor([[pad_id] * pad + list(r.prompt_ids) + list(r.generated_ids)
                              for r, pad in zip(rows, pads, strict=True)], device=device)
    columns = torch.arange(width, device=device).unsqueeze(0)
    pads_t = torch.tensor(pads, device=device).unsqueeze(1)
    valid = columns >= pads_t
    prompt_end = pads_t + torch.tensor([len(r.prompt_ids) for r in rows], device=device).unsqueeze(1)
    context = ForwardContext(rows=tuple(RowInfo(request_id=f"score-{i}", steering=r.steering, monitor=False,
                                                conditions=r.conditions) for i, r in enumerate(rows)),
                             generated_mask=columns >= prompt_end, valid_mask=valid)
    captured: dict[int, torch.Tensor] = {}  # decoder layer -> its output
    handles = []
    for layer in sorted({sae.hook_layer for sae in saes}):
        def read(module: Any, args: Any, output: Any, layer: int = layer) -> None:
            captured[layer] = (output[0] if isinstance(output, tuple) else output).detach()

        # Prepended: it runs before the SAE hook's steering, so features are read before steering.
        handles.append(decoder_layers(model)[layer].register_forward_hook(read, prepend=True))
    try:
        for interceptor in interceptors:
            interceptor.set_context(context)
        with torch.inference_mode():
            out = model(input_ids=input_ids, attention_mask=valid.long(),
                        position_ids=(columns - pads_t).clamp(min=0), use_cache=False, **_last_columns(model, rows))
        for interceptor in interceptors:
            interceptor.collect()  # nothing is monitored; this only clears the pass's state
    finally:
        for interceptor in interceptors:
            interceptor.set_context(None)
        for handle in handles:
            handle.remove()
    with torch.inference_mode():
        log_probs = out.logits.float().log_softmax(dim=-1)  # (B, T', V): the last T' columns of the input
        offset = width - log_probs.shape[1]
        results = []
        for b, row in enumerate(rows):
            n, first = len(row.generated_ids), pads[b] + len(row.prompt_ids)  # the input column of g_0
            dists = log_probs[b, first - 1 - offset : first - 1 - offset + n]  # column first-1+j predicts g_j
            ids = torch.tensor(list(row.generated_ids), dtype=torch.long, device=device)
            features = tuple(sae.encode(captured[sae.hook_layer][b, first : first + n]).float().cpu() for sae in saes)
            results.append(ScoredRow(logprobs=dists.gather(-1, ids.unsqueeze(-1)).squeeze(-1).cpu(),
                                     log_distributions=dists.clone() if keep_distributions else None,
                                     features=features[0] if features else None, all_features=features))
    return results


def _last_columns(model: torch.nn.Module, rows: Sequence[ScoringRow]) -> dict[str, int]:
    """Logits for the scoring columns only (left-padded, they are the last n+1), where the model can say so:
    the vocabulary-wide log-softmax over every prompt column is most of a scoring pass's cost."""
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return {}
    return {"logits_to_keep": max(len(r.generated_ids) for r in rows) + 1}


def token_diff(model: torch.nn.Module, interceptors: Sequence[ForwardInterceptor], *, prompt_ids: Sequence[int],
               steered_ids: Sequence[int], unsteered_ids: Sequence[int], steering: Any | None, pad_id: int,
               sae: SaeWeights | None = None, saes: Mapping[str, SaeWeights] | None = None, top_features: int = 10,
               conditions: Any | None = None) -> TokenDiff:
    """The diff of a steered greedy continuation against the unsteered one: one batched unsteered forward
    (the steered text, and the unsteered text for its features) and one steered forward. The changed features
    are read by `saes` (every attached SAE, by name), or by the one `sae`."""
    readers: dict[str | None, SaeWeights] = dict(saes) if saes else ({None: sae} if sae is not None else {})
    if not steered_ids:
        return TokenDiff(tokens=[], first_divergence=first_divergence(steered_ids, unsteered_ids),
                         top_changed_features=[])
    unsteered_rows = [ScoringRow(prompt_ids, steered_ids)]
    if readers and unsteered_ids:
        unsteered_rows.append(ScoringRow(prompt_ids, unsteered_ids))
    plain = _score_chunk(model, interceptors, unsteered_rows, pad_id=pad_id, saes=tuple(readers.values()),
                         keep_distributions=True)
    steered = _score_chunk(model, interceptors, [ScoringRow(prompt_ids, steered_ids, steering, conditions)], pad_id=pad_id,
                           keep_distributions=True)[0]
    kl = kl_divergence(steered.log_distributions, plain[0].log_distributions)
    tokens = [TokenScore(token_id=int(t), position=j, steered_logprob=s, unsteered_logprob=u, kl=max(0.0, k))
              for j, (t, s, u, k) in enumerate(zip(steered_ids, steered.logprobs.tolist(),
                                                   plain[0].logprobs.tolist(), kl.tolist(), strict=True))]
    ranked = [(rank, change) for n, name in enumerate(readers)
              for rank, change in enumerate(_changed_features(name, plain[0].all_features[n],
                                                              plain[1].all_features[n] if len(plain) > 1 else None,
                                                              top_features))]
    # Every SAE's 1st change, then every SAE's 2nd, ...; within a tier the larger relative change first.
    changes = [change for _, change in sorted(ranked, key=lambda item: (item[0], -abs(item[1].relative_delta)))]
    return TokenDiff(tokens=tokens, first_divergence=first_divergence(steered_ids, unsteered_ids),
                     top_changed_features=changes[:top_features])


def _changed_features(name: str | None, steered: torch.Tensor, unsteered: torch.Tensor | None,
                      top: int) -> list[FeatureChange]:
    """One SAE's `top` largest changes (a nonzero delta only), with delta / a_S (module docstring)."""
    after = steered.mean(dim=0)
    before = unsteered.mean(dim=0) if unsteered is not None else torch.zeros_like(after)
    delta = after - before
    both = steered if unsteered is None else torch.cat([steered, unsteered])
    firing = both[both > 0]
    scale = float(firing.mean()) if firing.numel() else 1.0  # nothing fires: every delta is 0, none is listed
    order = delta.abs().topk(min(top, delta.numel())).indices.tolist()
    return [FeatureChange(index=i, before=float(before[i]), after=float(after[i]), delta=float(delta[i]), sae=name,
                          relative_delta=float(delta[i]) / scale)
            for i in order if delta[i] != 0]
