"""Plain-PyTorch GRPO loss on top of a frozen LM head: the reference the fused kernels are checked against.

It materializes the full tokens x vocab logits (matmul, log_softmax, gather), which is what the fused
paths in `grpo_loss.py` and `grpo_loss_triton.py` avoid. Autograd gives the gradient for `hidden`;
the head weight is frozen and never needs one.
"""
from __future__ import annotations

import torch


def accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise: the dtype logits and losses are computed in."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def reference_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """log softmax(hidden @ weight.T / temperature)[target] per token (N,), via materialized N x V logits."""
    acc = accumulation_dtype(hidden)
    logits = hidden.to(acc) @ weight.to(acc).T
    if temperature != 1.0:
        logits = logits / temperature
    return logits.log_softmax(dim=-1).gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def check_loss_inputs(beta: float, ref_logp: torch.Tensor | None) -> None:
    """Reject a KL term without reference log-probs (the same rule as sparselayer.rl.grpo)."""
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs reference log-probs")


def per_token_grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, epsilon: float,
                        epsilon_high: float, beta: float, ref_logp: torch.Tensor | None = None,
                        tis_weights: torch.Tensor | None = None) -> torch.Tensor:
    """-min(rA, clip(r, 1-eps, 1+eps_high)A) [x tis] + beta * k3 KL per token, differentiable in logp."""
    dtype = logp.dtype
    ratio = torch.exp(logp - old_logp.to(dtype))
    adv = advantages.to(dtype)
    loss = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * adv)
    if tis_weights is not None:
        loss = loss * tis_weights.to(dtype)
    if beta > 0:
        delta = ref_logp.to(dtype) - logp
        loss = loss + beta * (torch.exp(delta) - delta - 1)
    return loss


def reference_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, old_logp: torch.Tensor,
                        advantages: torch.Tensor, token_weights: torch.Tensor, epsilon: float, epsilon_high: float,
                        beta: float, ref_logp: torch.Tensor | None = None, tis_weights: torch.Tensor | None = None,
                        temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_t token_weights_t * per-token GRPO loss, logp (N,)) with materialized logits: the ground truth.

    All tensors but `weight` (V x H) are flat over tokens: hidden (N, H), the rest (N,). Token weights
    carry the loss type and the padding mask (`sparselayer.rl.grpo.token_weights`, flattened).
    """
    check_loss_inputs(beta, ref_logp)
    logp = reference_logprobs(hidden, weight, targets, temperature)
    per_token = per_token_grpo_loss(logp, old_logp, advantages, epsilon, epsilon_high, beta, ref_logp, tis_weights)
    return (token_weights.to(logp.dtype) * per_token).sum(), logp
