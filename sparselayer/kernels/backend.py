"""What every kernel backend shares: backend resolution, the accumulation dtype, the primitive interfaces.

A backend ("torch": chunked PyTorch, any device; "triton": CUDA, or CPU under TRITON_INTERPRET=1) supplies
a few primitives per op, described by the dataclasses here; the autograd Functions that use them are
written once per op (`head_logprobs.py`, `norm_mlp.py`). This module imports neither triton nor any
kernel module, so every kernel module, torch or Triton, can import it without a cycle.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_BACKEND = "SPARSELAYER_KERNELS"


def triton_available() -> bool:
    """True when the triton package imports (checked lazily, never at package import)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """'torch' or 'triton': an explicit argument wins, then SPARSELAYER_KERNELS, then triton on CUDA only."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND, "").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_BACKEND} must be 'torch' or 'triton', got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_available() else "torch"
    return backend


def accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise: the dtype logits, norms and losses are computed in."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class HeadForward:
    """What a one-pass LM-head forward keeps for an elementwise backward: logsumexp and target logit (N,), the
    off-target softmax mass q = 1 - p(target) (N,) and the off-target mean sum_{v != y} p_v W_v (N, H)."""

    lse: torch.Tensor
    target: torch.Tensor
    off_mass: torch.Tensor
    mean: torch.Tensor


@dataclass(frozen=True)
class LMHeadKernels:
    """The primitives of the fused LM-head log-probs; the autograd Function is shared."""

    # (hidden, weight, targets, temperature) -> (logsumexp (N,), target logit (N,)), both at temperature
    lse_and_target: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
    # (hidden, weight, targets, lse, dL/dlogp, temperature) -> dL/dhidden, hidden's shape and dtype
    grad_hidden: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
    # run grad_hidden on the tokens with a nonzero gradient only (padding costs nothing); it costs a
    # gather/scatter and, on a GPU, a device sync, so a backend whose tiles are cheap may leave it off
    skip_zero_grad: bool = True
    # optional (hidden, weight, targets, temperature) -> HeadForward: when present and hidden requires grad, the
    # forward keeps the off-target mass and mean and the backward is elementwise (no recompute)
    lse_target_and_mean: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], HeadForward] | None = None


@dataclass(frozen=True)
class NormMLPKernels:
    """The four primitives of the fused RMSNorm / SwiGLU; the autograd Functions are shared."""

    # (x (N, H), weight (H,), eps) -> (y (N, H), rstd (N,) float32)
    rms_forward: Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
    # (dy, x, weight, rstd, need_dw) -> (dx, dw or None)
    rms_backward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool],
                           tuple[torch.Tensor, torch.Tensor | None]]
    # (gate, up) -> silu(gate) * up
    swiglu_forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    # (d act, gate, up) -> (d gate, d up)
    swiglu_backward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
