"""A small, generic sparse-autoencoder trainer for activations held in memory (plain torch, CPU-friendly).

It trains a BatchTopK SAE (the k largest pre-activations across the whole batch fire; no L1
coefficient to tune, and the sparsity is what you ask for) and turns it into a JumpReLU SAE for
inference with one global threshold, the way sae-lens converts its own BatchTopK SAEs. JumpReLU
keeps every feature's activation independent of the others, so the steering hook can encode just
the columns it clamps. The result is saved in sae-lens' on-disk format with sae-lens' own classes.

Training runs on inputs scaled to norm ≈ sqrt(d_in) (residual norms vary a lot between models and
layers, and this keeps one learning rate good for all); the scale is folded back in afterwards, so
the saved SAE takes raw activations, its decoder rows have unit norm, and a feature's activation is
its contribution to the residual in the model's own units.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class SAETrainConfig:
    d_sae: int = 4096
    k: int = 32  # mean active features per token
    steps: int = 1200
    batch_size: int = 1024
    lr: float = 2e-3
    warmup_steps: int = 30
    decay_fraction: float = 0.3  # linear decay to zero over the last part of training
    aux_k: int = 256  # dead latents that try to explain the residual error (AuxK loss)
    aux_coefficient: float = 1 / 32
    dead_after_steps: int = 60  # a latent that has not fired for this many steps counts as dead
    seed: int = 0


@dataclass
class JumpReLUWeights:
    """Inference weights in raw activation units (what sae-lens' JumpReLUSAE computes)."""

    W_enc: Tensor  # (d_in, d_sae)
    b_enc: Tensor  # (d_sae,)
    W_dec: Tensor  # (d_sae, d_in), unit rows
    b_dec: Tensor  # (d_in,)
    threshold: Tensor  # (d_sae,)

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def encode(self, x: Tensor) -> Tensor:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        return pre.relu() * (pre > self.threshold)

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec


@dataclass(frozen=True)
class SAEMetrics:
    fvu: float  # fraction of variance unexplained
    l0: float  # mean number of active features per token
    dead_fraction: float  # features that never fired on the data given
    tokens: int


def _lr_factor(step: int, cfg: SAETrainConfig) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    decay_start = int(cfg.steps * (1 - cfg.decay_fraction))
    decay = 1.0 if step < decay_start else max(0.0, (cfg.steps - step) / max(1, cfg.steps - decay_start))
    return warm * decay


def _batch_topk(pre: Tensor, k: int) -> Tensor:
    """Keep the k·B largest positive pre-activations of the batch (BatchTopK), zero the rest.

    Two stages because one top-k over all B·d_sae values is several times slower on CPU than a
    per-row top-2k followed by a top-k over those; the result differs only if one token holds more
    than 2k of the batch's winners, which does not happen at these sparsities.
    """
    per_row = min(2 * k, pre.shape[1])
    row_vals, row_cols = pre.relu().topk(per_row, dim=-1, sorted=False)
    _, flat = row_vals.flatten().topk(k * pre.shape[0], sorted=False)
    rows = flat // per_row
    cols = row_cols.flatten()[flat]
    mask = torch.zeros_like(pre, dtype=torch.bool)
    mask[rows, cols] = True
    return pre.relu() * mask


def train_batchtopk_sae(
    acts: Tensor,
    cfg: SAETrainConfig,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[JumpReLUWeights, float]:
    """Train on `acts` (N, d_in), raw units. Returns the inference weights and the input scale used."""
    generator = torch.Generator().manual_seed(cfg.seed)
    acts = acts.float()
    n, d_in = acts.shape
    scale = float(acts.norm(dim=-1).median()) / math.sqrt(d_in)
    x_all = acts / scale

    W_dec = torch.randn(cfg.d_sae, d_in, generator=generator)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    W_dec = W_dec.requires_grad_()
    W_enc = W_dec.detach().T.clone().requires_grad_()  # tied init: each latent starts as its own detector
    b_enc = torch.zeros(cfg.d_sae, requires_grad=True)
    b_dec = x_all[torch.randperm(n, generator=generator)[:8192]].mean(0).requires_grad_()
    optimizer = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=cfg.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg))
    steps_since_fired = torch.zeros(cfg.d_sae, dtype=torch.long)
    variance = (x_all - x_all.mean(0)).pow(2).sum(-1).mean()

    order = torch.randperm(n, generator=generator)
    cursor = 0
    for step in range(cfg.steps):
        if cursor + cfg.batch_size > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        x = x_all[order[cursor:cursor + cfg.batch_size]]
        cursor += cfg.batch_size

        # b_dec is detached on the encoder side: it saves a B×d_sae matmul per step, and the
        # decoder side alone places it well.
        pre = (x - b_dec.detach()) @ W_enc + b_enc
        f = _batch_topk(pre, cfg.k)
        x_hat = f @ W_dec + b_dec
        error = x - x_hat
        mse = error.pow(2).sum(-1).mean()
        loss = mse / variance

        fired = (f > 0).any(0)
        steps_since_fired = torch.where(fired, 0, steps_since_fired + 1)
        dead = steps_since_fired > cfg.dead_after_steps
        aux = torch.zeros(())
        if dead.any():
            # AuxK: the top dead latents try to explain what the live ones missed, which revives them.
            k_aux = min(cfg.aux_k, int(dead.sum()))
            dead_pre = pre.masked_fill(~dead, float("-inf"))
            aux_vals, aux_cols = dead_pre.topk(k_aux, dim=-1)
            f_aux = torch.zeros_like(pre).scatter(-1, aux_cols, aux_vals.relu())
            err_hat = f_aux @ W_dec
            target = error.detach()
            aux = (err_hat - target).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean().clamp_min(1e-8)
            loss = loss + cfg.aux_coefficient * aux

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        if on_step is not None:
            on_step(step, {"fvu": float(mse.detach() / variance), "dead": float(dead.float().mean())})

    with torch.no_grad():
        threshold = _global_threshold(x_all, W_enc, b_enc, b_dec, cfg.k)
        weights = JumpReLUWeights(
            W_enc=W_enc.detach().clone(),
            b_enc=b_enc.detach() * scale,
            W_dec=W_dec.detach().clone(),
            b_dec=b_dec.detach() * scale,
            threshold=torch.full((cfg.d_sae,), threshold * scale),
        )
    return weights, scale


def _global_threshold(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, chunk: int = 4096) -> float:
    """The activation above which k latents per token fire on average over `x`, as BatchTopK did."""
    candidates = []
    for start in range(0, x.shape[0], chunk):
        pre = (x[start:start + chunk] - b_dec) @ W_enc + b_enc
        candidates.append(pre.topk(min(4 * k, pre.shape[1]), dim=-1).values.flatten())
    values = torch.cat(candidates)
    return float(values.topk(k * x.shape[0]).values.min().clamp_min(0.0))


@torch.no_grad()
def evaluate_sae(weights: JumpReLUWeights, acts: Tensor, chunk: int = 4096) -> SAEMetrics:
    acts = acts.float()
    mean = acts.mean(0)
    err = total = active = 0.0
    fired = torch.zeros(weights.d_sae, dtype=torch.bool)
    for start in range(0, acts.shape[0], chunk):
        x = acts[start:start + chunk]
        f = weights.encode(x)
        err += float((weights.decode(f) - x).pow(2).sum())
        total += float((x - mean).pow(2).sum())
        active += float((f > 0).sum())
        fired |= (f > 0).any(0)
    return SAEMetrics(fvu=err / max(total, 1e-12), l0=active / max(1, acts.shape[0]),
                      dead_fraction=1.0 - float(fired.float().mean()), tokens=int(acts.shape[0]))


def save_sae_lens(weights: JumpReLUWeights, path: Path, *, metadata: dict[str, Any]) -> Path:
    """Write cfg.json + sae_weights.safetensors with sae-lens' JumpReLUSAE (loads with SAE.load_from_disk)."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    cfg = JumpReLUSAEConfig(d_in=weights.d_in, d_sae=weights.d_sae, dtype="float32", device="cpu",
                            apply_b_dec_to_input=True, normalize_activations="none",
                            metadata=SAEMetadata(**metadata))
    sae = JumpReLUSAE(cfg)
    sae.load_state_dict({"W_enc": weights.W_enc, "b_enc": weights.b_enc, "W_dec": weights.W_dec,
                         "b_dec": weights.b_dec, "threshold": weights.threshold})
    sae.save_model(path)
    return path
