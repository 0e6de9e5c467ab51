"""Fused kernels for the trained layer's GRPO step, each beside its plain-PyTorch reference.

`head_logprobs`: LM-head log-probs without a tokens x vocab tensor (dH only, the head is frozen);
`grpo_loss` / `logprobs`: the one GRPO objective (`sparselayer.objective`) on those log-probs;
`FusedLMHeadGRPOLoss`: the same as an nn.Module other trainers drop in.
`rms_norm` / `swiglu` / `frozen_mlp`: fused RMSNorm and SwiGLU MLP with input-grad-only variants for
frozen layers; `use_fused_kernels` swaps them into a model. Backend (`resolve_backend`): Triton on CUDA,
chunked PyTorch elsewhere; an explicit backend (`--kernels torch|triton`) wins, then the
SPARSELAYER_KERNELS environment variable, then the device. Importing this package never imports triton.
"""
from .backend import resolve_backend
from .grpo_loss import (
                        fused_grpo_loss,
                        fused_logprobs,
                        grpo_loss,
                        logprobs,
                        reference_grpo_loss,
                        triton_grpo_loss,
                        triton_logprobs,
)
from .head_logprobs import head_logprobs
from .head_logprobs_reference import reference_logprobs
from .loss_module import FusedLMHeadGRPOLoss
from .norm_mlp import frozen_mlp, rms_norm, swiglu
from .norm_mlp_reference import reference_mlp, reference_rms_norm, reference_swiglu
from .patch import resolve_kernels, use_fused_kernels

__all__ = ["FusedLMHeadGRPOLoss",
           "fused_grpo_loss", "fused_logprobs", "grpo_loss", "head_logprobs", "logprobs", "reference_grpo_loss",
           "reference_logprobs", "resolve_backend", "triton_grpo_loss", "triton_logprobs", "frozen_mlp", "rms_norm",
           "swiglu", "reference_mlp", "reference_rms_norm", "reference_swiglu", "resolve_kernels",
           "use_fused_kernels"]
