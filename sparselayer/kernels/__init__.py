"""Fused kernels for the trained layer's GRPO step, each beside its plain-PyTorch reference.

`grpo_loss` / `logprobs`: LM-head log-prob + GRPO loss without a tokens x vocab tensor (dH only,
the head is frozen); Triton on CUDA, chunked PyTorch elsewhere (SPARSELAYER_KERNELS=torch|triton).
"""
from .grpo_loss import fused_grpo_loss, fused_logprobs, grpo_loss, logprobs
from .grpo_loss_reference import reference_grpo_loss, reference_logprobs

__all__ = ["fused_grpo_loss", "fused_logprobs", "grpo_loss", "logprobs", "reference_grpo_loss", "reference_logprobs"]
