"""The GRPO loss through a frozen LM head: the one objective (`sparselayer.objective`) on head log-probs.

Every entry point is the same composition: log-probs (N,) from the head, then
sum_t token_weights_t * per_token_loss_t, with dL/dlogp left to autograd and dL/dhidden to the head's
backward. Only the log-prob path differs: fused (`head_logprobs`, no tokens x vocab tensor; chunked
PyTorch or Triton) or the materialized-logits reference. All tensors but the head weight (V x H) are
flat over tokens: hidden (N, H), the rest (N,); token weights carry the loss type's normalization and the
padding mask (`sparselayer.objective.token_weights`, flattened). old_logp=None is the on-policy pass:
the old log-probs are the policy's own, detached (ratio 1). `tis_weights`: the sampler
importance-sampling weights of any mode (`sparselayer.objective.sampling_correction`).

The remaining objective settings (use_bias_correction_kl, importance_sampling_level, the SAPO
temperatures) come in the keyword-only `options` (`ObjectiveOptions`; its loss_type, epsilon,
epsilon_high and beta must agree with the arguments); unset, the plain form (token level, no KL
correction). Sequence-level options need to know each flat token's sequence: `seq_index` (N,), its row,
and `mask` (N,), the tokens that count in a sequence's mean (default: every listed token).
"""
from __future__ import annotations

from typing import Any

import torch

from ..objective import ObjectiveOptions, per_token_loss
from .backend import LMHeadKernels
from .head_logprobs import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_CHUNK_VOCAB,
    head_kernels,
    head_logprobs,
    head_logprobs_with,
    torch_kernels,
)
from .head_logprobs_reference import reference_logprobs


def weighted_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, advantages: torch.Tensor,
                  token_weights: torch.Tensor, epsilon: float, epsilon_high: float, beta: float,
                  ref_logp: torch.Tensor | None = None, tis_weights: torch.Tensor | None = None,
                  loss_type: str = "grpo", *, options: ObjectiveOptions | None = None,
                  mask: torch.Tensor | None = None, seq_index: torch.Tensor | None = None) -> torch.Tensor:
    """sum_t token_weights_t * per_token_loss_t on flat log-probs (differentiable in logp)."""
    old = logp.detach() if old_logp is None else old_logp
    terms = per_token_loss(logp, old, advantages, epsilon, epsilon_high, beta, ref_logp, tis_weights, loss_type,
                           options=options, mask=mask, seq_index=seq_index)
    return (token_weights.to(logp.dtype) * terms.loss).sum()


def _loss_with(kernels: LMHeadKernels, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
               temperature: float, *objective_args, **objective_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logp) with the fused head on the given primitives: the body of every fused entry point."""
    logp = head_logprobs_with(kernels, hidden, weight, targets, temperature)
    return weighted_loss(logp, *objective_args, **objective_kwargs), logp


# ---------------------------------------------------------------------------------------------------
# the loss


def grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, old_logp: torch.Tensor | None,
              advantages: torch.Tensor, token_weights: torch.Tensor, epsilon: float, epsilon_high: float, beta: float,
              ref_logp: torch.Tensor | None = None, tis_weights: torch.Tensor | None = None, temperature: float = 1.0,
              backend: str = "auto", loss_type: str = "grpo", **objective: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logp (N,)) through the fused head: Triton on CUDA tensors, chunked PyTorch elsewhere
    (`backend` and SPARSELAYER_KERNELS override). Gradient for hidden only; the head weight is frozen."""
    logp = head_logprobs(hidden, weight, targets, temperature, backend)
    return weighted_loss(logp, old_logp, advantages, token_weights, epsilon, epsilon_high, beta, ref_logp,
                         tis_weights, loss_type, **objective), logp


def fused_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, old_logp: torch.Tensor | None,
                    advantages: torch.Tensor, token_weights: torch.Tensor, epsilon: float, epsilon_high: float,
                    beta: float, ref_logp: torch.Tensor | None = None, tis_weights: torch.Tensor | None = None,
                    temperature: float = 1.0, loss_type: str = "grpo", *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                    chunk_vocab: int = DEFAULT_CHUNK_VOCAB, **objective: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`grpo_loss` on the chunked PyTorch backend with a chosen tile (memory O(tile + N x H), not O(N x V))."""
    return _loss_with(torch_kernels(chunk_tokens, chunk_vocab), hidden, weight, targets, temperature, old_logp,
                      advantages, token_weights, epsilon, epsilon_high, beta, ref_logp, tis_weights, loss_type,
                      **objective)


def triton_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, old_logp: torch.Tensor | None,
                     advantages: torch.Tensor, token_weights: torch.Tensor, epsilon: float, epsilon_high: float,
                     beta: float, ref_logp: torch.Tensor | None = None, tis_weights: torch.Tensor | None = None,
                     temperature: float = 1.0, loss_type: str = "grpo",
                     **objective: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`grpo_loss` on the Triton backend (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return _loss_with(head_kernels("triton", hidden.device), hidden, weight, targets, temperature, old_logp,
                      advantages, token_weights, epsilon, epsilon_high, beta, ref_logp, tis_weights, loss_type,
                      **objective)


def reference_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        old_logp: torch.Tensor | None, advantages: torch.Tensor, token_weights: torch.Tensor,
                        epsilon: float, epsilon_high: float, beta: float, ref_logp: torch.Tensor | None = None,
                        tis_weights: torch.Tensor | None = None, temperature: float = 1.0,
                        loss_type: str = "grpo", **objective: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logp) with materialized N x V logits and plain autograd: the ground truth of the fused paths."""
    logp = reference_logprobs(hidden, weight, targets, temperature)
    return weighted_loss(logp, old_logp, advantages, token_weights, epsilon, epsilon_high, beta, ref_logp,
                         tis_weights, loss_type, **objective), logp


# ---------------------------------------------------------------------------------------------------
# no-grad log-probs (old-policy and reference passes)


def logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
             backend: str = "auto") -> torch.Tensor:
    """log p(target) per token (N,) without gradient, through the fused head dispatched like grpo_loss."""
    with torch.no_grad():
        return head_logprobs(hidden, weight, targets, temperature, backend)


def fused_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS, chunk_vocab: int = DEFAULT_CHUNK_VOCAB) -> torch.Tensor:
    """`logprobs` on the chunked PyTorch backend with a chosen tile."""
    with torch.no_grad():
        return head_logprobs_with(torch_kernels(chunk_tokens, chunk_vocab), hidden, weight, targets, temperature)


def triton_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """`logprobs` on the Triton backend."""
    with torch.no_grad():
        return head_logprobs_with(head_kernels("triton", hidden.device), hidden, weight, targets, temperature)
