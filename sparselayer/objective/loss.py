"""The per-token GRPO-family objective and the token weights that turn it into a batch loss.

A loss type is two choices: a surrogate (one function of the token's log-prob, old log-prob and
advantage) and a normalization (how tokens are weighted into the batch loss). The batch loss is
sum_t w_t * l_t over completion tokens, with weights w_t fixed by the normalization, so
micro-batches just sum their share and gradient accumulation reproduces the full-batch loss
exactly, whatever the packing. Adding a loss type is one surrogate function and one table row.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# surrogate(ratio, logp, advantages, epsilon, epsilon_high) -> (per-token loss, clipped mask)
Surrogate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], tuple[torch.Tensor, torch.Tensor]]


def clipped_surrogate(ratio: torch.Tensor, logp: torch.Tensor, adv: torch.Tensor, epsilon: float,
                      epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate -min(rA, clip(r, 1-eps, 1+eps_high)A); clipped where the clip binds."""
    loss = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * adv)
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    return loss, clipped


def cispo_surrogate(ratio: torch.Tensor, logp: torch.Tensor, adv: torch.Tensor, epsilon: float,
                    epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO (MiniMax-M1; TRL's definition): -sg(min(r, eps_high)) * A * logp. The importance weight is
    clipped and detached, so every token keeps its policy gradient; eps_high caps the weight itself."""
    weight = torch.clamp(ratio, max=epsilon_high).detach()
    return -weight * adv * logp, (ratio > epsilon_high) & (adv > 0)


@dataclass(frozen=True)
class LossType:
    """A loss type: its surrogate and its normalization (see `token_weights`)."""

    surrogate: Surrogate
    normalization: str  # sequence | batch_tokens | max_length | micro_batch_tokens


LOSS_TYPE_TABLE = {
    "grpo": LossType(clipped_surrogate, "sequence"),
    "dapo": LossType(clipped_surrogate, "batch_tokens"),
    "dr_grpo": LossType(clipped_surrogate, "max_length"),
    "bnpo": LossType(clipped_surrogate, "micro_batch_tokens"),
    "cispo": LossType(cispo_surrogate, "batch_tokens"),
}
LOSS_TYPES = tuple(LOSS_TYPE_TABLE)


def _loss_type(name: str) -> LossType:
    if name not in LOSS_TYPE_TABLE:
        raise ValueError(f"unknown loss type {name!r} (one of {', '.join(LOSS_TYPES)})")
    return LOSS_TYPE_TABLE[name]


@dataclass(frozen=True)
class BatchTotals:
    """Counts of the WHOLE rollout batch when it is split across ranks (data-parallel training): the
    batch-level normalisers divide by these, so each rank's loss is its exact share of the global one."""

    sequences: int
    tokens: int
    micro_batches: int


def token_weights(mask: torch.Tensor, loss_type: str, max_completion_length: int,
                  micro_batches: list[list[int]], totals: BatchTotals | None = None) -> torch.Tensor:
    """Per-token weights w (B x T) such that the batch loss is (w * per_token_loss).sum().

    sequence (grpo): mean over each sequence's tokens, then over sequences; batch_tokens (dapo, cispo):
    mean over all tokens of the rollout batch; max_length (dr_grpo): sum over tokens / (sequences *
    max_completion_length); micro_batch_tokens (bnpo): token mean within each micro-batch, averaged
    over micro-batches. `totals`: the global batch's counts when `mask` is one rank's share (unset: this
    batch is the whole batch).
    """
    normalization = _loss_type(loss_type).normalization
    mask = mask if mask.is_floating_point() else mask.float()
    n = mask.shape[0] if totals is None else totals.sequences
    if normalization == "sequence":
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1) / n
    if normalization == "batch_tokens":
        tokens = mask.sum() if totals is None else torch.tensor(totals.tokens, dtype=mask.dtype, device=mask.device)
        return mask / tokens.clamp(min=1)
    if normalization == "max_length":
        return mask / (n * max_completion_length)
    count = len(micro_batches) if totals is None else totals.micro_batches
    weights = torch.zeros_like(mask)
    for rows in micro_batches:
        weights[rows] = mask[rows] / mask[rows].sum().clamp(min=1) / count
    return weights


@dataclass
class TokenLoss:
    """Per-token loss plus the diagnostics GRPO reports."""

    loss: torch.Tensor  # to be weighted by token_weights
    kl: torch.Tensor  # k3 estimate (zeros when beta == 0)
    clipped: torch.Tensor  # bool, where the surrogate's clip is active


def per_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                   epsilon: float, epsilon_high: float, beta: float = 0.0,
                   ref_logp: torch.Tensor | None = None, tis: torch.Tensor | None = None,
                   loss_type: str = "grpo") -> TokenLoss:
    """The loss type's surrogate [x TIS weight] plus beta * k3 KL to the reference, per token.

    Differentiable in `logp` (B x T, or flat N); `old_logp`, `ref_logp` and `tis` have its shape;
    `advantages` is per sequence (B,) for B x T log-probs, or per token. Computed in logp's dtype.
    """
    dtype = logp.dtype
    adv = advantages.to(dtype)
    if adv.dim() == logp.dim() - 1:
        adv = adv.unsqueeze(-1)
    ratio = torch.exp(logp - old_logp.to(dtype))
    loss, clipped = _loss_type(loss_type).surrogate(ratio, logp, adv, epsilon, epsilon_high)
    if tis is not None:
        loss = loss * tis.to(dtype)
    kl = torch.zeros_like(logp)
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs reference log-probs")
        delta = ref_logp.to(dtype) - logp
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    return TokenLoss(loss=loss, kl=kl, clipped=clipped)


def tis_weights(old_logp: torch.Tensor, sampling_logp: torch.Tensor, cap: float,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Truncated importance-sampling weights min(exp(old_logp - sampling_logp), cap) per token, detached.

    They correct for the sampler (vLLM) and the trainer computing slightly different probabilities
    for the same policy; padding positions (mask 0) get weight 1.
    """
    weights = torch.exp(old_logp.detach().float() - sampling_logp.detach().float()).clamp(max=cap)
    return weights if mask is None else torch.where(mask.bool(), weights, torch.ones_like(weights))
