"""GRPO math: group-normalized advantages, the clipped surrogate with k3 KL, and loss-type weights.

The loss of a rollout batch is written as sum_t w_t * l_t over completion tokens, with per-token
weights w_t fixed by the loss type. Micro-batches then just sum their share, so gradient
accumulation reproduces the full-batch loss exactly, whatever the packing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """A_i = r_i - mean(group), divided by the group's (or the batch's) std unless scale is 'none' (Dr. GRPO)."""
    groups = rewards.view(-1, num_generations)
    adv = (groups - groups.mean(dim=1, keepdim=True)).view(-1)
    if scale_rewards == "group":
        adv = adv / (groups.std(dim=1).repeat_interleave(num_generations) + 1e-4)
    elif scale_rewards == "batch":
        adv = adv / (rewards.std() + 1e-4)
    return adv


def token_weights(mask: torch.Tensor, loss_type: str, max_completion_length: int,
                  micro_batches: list[list[int]]) -> torch.Tensor:
    """Per-token weights w (B x T) such that the batch loss is (w * per_token_loss).sum().

    grpo: mean over each sequence's tokens, then over sequences; dapo: mean over all tokens of
    the rollout batch; dr_grpo: sum over tokens / (sequences * max_completion_length);
    bnpo: token mean within each micro-batch, averaged over micro-batches.
    """
    mask = mask if mask.is_floating_point() else mask.float()
    n = mask.shape[0]
    if loss_type == "grpo":
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1) / n
    if loss_type == "dapo":
        return mask / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return mask / (n * max_completion_length)
    if loss_type == "bnpo":
        weights = torch.zeros_like(mask)
        for rows in micro_batches:
            weights[rows] = mask[rows] / mask[rows].sum().clamp(min=1) / len(micro_batches)
        return weights
    raise ValueError(f"unknown loss type {loss_type!r}")


@dataclass
class TokenLoss:
    """Per-token surrogate loss plus the diagnostics GRPO reports."""

    loss: torch.Tensor  # B x T, to be weighted by token_weights
    kl: torch.Tensor  # B x T, k3 estimate (zeros when beta == 0)
    clipped: torch.Tensor  # B x T bool, where the clip is active


def per_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                   epsilon: float, epsilon_high: float, beta: float = 0.0,
                   ref_logp: torch.Tensor | None = None, tis: torch.Tensor | None = None) -> TokenLoss:
    """Clipped surrogate -min(rA, clip(r, 1-eps, 1+eps_high)A) [x TIS weight] plus beta * k3 KL to the reference."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * adv, clipped_ratio * adv)
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    if tis is not None:
        loss = loss * tis
    kl = torch.zeros_like(logp)
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs reference log-probs")
        delta = ref_logp - logp
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
