"""Plain-PyTorch RMSNorm and SwiGLU MLP: the references the fused kernels in `norm_mlp.py` are checked against.

They follow the Hugging Face Qwen3/Qwen2/Llama modules op for op (RMSNorm in float32, then cast back
and scaled by the weight; MLP = down(silu(gate(x)) * up(x))), and compute in float64 for float64 inputs.
Autograd gives every gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# float64 for float64 inputs, float32 otherwise: the dtype the norm statistics are computed in
from .backend import accumulation_dtype as norm_dtype


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)), the statistics in float32 (float64 for float64 x), as HF does."""
    h = x.to(norm_dtype(x))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def reference_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the gated activation of a SwiGLU MLP."""
    return F.silu(gate) * up


def reference_mlp(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor,
                  gate_b: torch.Tensor | None = None, up_b: torch.Tensor | None = None,
                  down_b: torch.Tensor | None = None) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with optional biases (Llama's mlp_bias)."""
    return F.linear(reference_swiglu(F.linear(x, gate_w, gate_b), F.linear(x, up_w, up_b)), down_w, down_b)
