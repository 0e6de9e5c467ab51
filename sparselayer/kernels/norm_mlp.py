"""Fused RMSNorm and SwiGLU for the trained layer and the frozen layers above it (autograd Functions + dispatch).

What autograd keeps for the backward (measured, `benchmarks/bench_norm_mlp.py`): `F.linear` with a frozen
weight saves only the weight, never its input; HF's RMSNorm saves its float32 input and rstd; HF's
MLP saves gate, silu(gate) and up (3 x intermediate per token). Here:

* `rms_norm`: saves x and rstd (one float per row); dW is computed only when the weight requires
  grad (trained layer), so the frozen suffix runs the input-grad-only backward.
* `swiglu`: silu(gate) * up in one pass; saves gate and up and recomputes silu in the backward.
* `frozen_mlp`: the whole MLP of a frozen layer, saving only its input x (hidden size per token) and
  recomputing gate and up in the backward, row chunk by row chunk: the input-grad-only MLP needs
  no weight gradients, so its rows are independent and its transients stay one chunk big.

Backends (same maths, same saved tensors): chunked PyTorch (here; any device, the CPU default) and
Triton (`norm_mlp_triton`, CUDA, or CPU under TRITON_INTERPRET=1), picked by `kernels_for`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import NormMLPKernels, resolve_backend
from .backend import accumulation_dtype as norm_dtype

# Row chunks of about this many elements (rows x width) bound the transients of the elementwise work and
# of the frozen MLP's recomputation: small on CPU (memory is what matters there), larger on CUDA.
CHUNK_ELEMENTS = 1 << 20
CUDA_CHUNK_ELEMENTS = 1 << 24


def row_chunks(rows: int, width: int, device: torch.device) -> list[slice]:
    """Slices of about CHUNK_ELEMENTS (CUDA_CHUNK_ELEMENTS on CUDA) elements over `rows` rows of `width` columns."""
    elements = CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS
    step = max(1, elements // max(1, width))
    return [slice(r, r + step) for r in range(0, rows, step)]


# ---------------------------------------------------------------------------------------------------
# chunked PyTorch primitives


def torch_rms_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's RMSNorm ops chunk by chunk, also returning rstd (float32, float64 for float64 x)."""
    acc = norm_dtype(x)
    y = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    rstd = torch.empty(x.shape[0], dtype=acc, device=x.device)
    for r in row_chunks(*x.shape, x.device):
        h = x[r].to(acc)
        inv = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        rstd[r] = inv.squeeze(1)
        y[r] = weight * (h * inv).to(x.dtype)
    return y, rstd


def torch_rms_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                       need_dw: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * w; dw = sum_rows dy * xhat (only if asked)."""
    acc = norm_dtype(x)
    dx = torch.empty_like(x)
    dw = torch.zeros(x.shape[1], dtype=acc, device=x.device) if need_dw else None
    w = weight.to(acc)
    for r in row_chunks(*x.shape, x.device):
        inv = rstd[r].to(acc).unsqueeze(1)
        xhat = x[r].to(acc) * inv
        g = dy[r].to(acc)
        if need_dw:
            dw += (g * xhat.to(x.dtype).to(acc)).sum(0)
        g = g * w
        dx[r] = inv * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx, dw


def torch_swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in float32 (float64 for float64), one rounding to the input dtype."""
    acc = norm_dtype(gate)
    out = torch.empty_like(gate)
    for r in row_chunks(*gate.shape, gate.device):
        out[r] = F.silu(gate[r].to(acc)) * up[r].to(acc)
    return out


def torch_swiglu_backward(grad: torch.Tensor, gate: torch.Tensor,
                          up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d gate = grad * up * s'(gate), d up = grad * silu(gate), with silu recomputed from gate."""
    acc = norm_dtype(gate)
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    for r in row_chunks(*gate.shape, gate.device):
        g, d = gate[r].to(acc), grad[r].to(acc)
        sig = torch.sigmoid(g)
        dup[r] = d * g * sig
        dgate[r] = d * up[r].to(acc) * sig * (1 + g * (1 - sig))
    return dgate, dup


TORCH_KERNELS = NormMLPKernels(torch_rms_forward, torch_rms_backward, torch_swiglu_forward, torch_swiglu_backward)


def kernels_for(backend: str, device: torch.device) -> NormMLPKernels:
    """The primitives of `backend` ('auto' | 'torch' | 'triton'); Triton is imported only here."""
    if resolve_backend(backend, device) == "triton":
        from .norm_mlp_triton import triton_norm_mlp_kernels

        return triton_norm_mlp_kernels()
    return TORCH_KERNELS


# ---------------------------------------------------------------------------------------------------
# autograd Functions


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A contiguous (rows, last dim) view or copy."""
    return t.reshape(-1, t.shape[-1]).contiguous()


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm saving x and rstd; dW only when the weight requires grad (frozen layers: dX only)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, kernels: NormMLPKernels) -> torch.Tensor:
        x2 = _rows(x)
        y, rstd = kernels.rms_forward(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.kernels = kernels
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = ctx.kernels.rms_backward(_rows(dy), x2, weight, rstd, ctx.needs_input_grad[1])
        dx = dx.view(dy.shape) if ctx.needs_input_grad[0] else None
        return dx, None if dw is None else dw.to(weight.dtype), None, None


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up saving gate and up only (silu is recomputed in the backward)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, kernels: NormMLPKernels) -> torch.Tensor:
        g2, u2 = _rows(gate), _rows(up)
        ctx.save_for_backward(g2, u2)
        ctx.kernels = kernels
        return kernels.swiglu_forward(g2, u2).view(gate.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g2, u2 = ctx.saved_tensors
        dgate, dup = ctx.kernels.swiglu_backward(_rows(grad), g2, u2)
        return dgate.view(grad.shape), dup.view(grad.shape), None


def _gate_up(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, bg: torch.Tensor | None,
             bu: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two input projections of one row chunk."""
    return F.linear(x, wg, bg), F.linear(x, wu, bu)


class FrozenMLPFunction(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) with frozen weights: saves x only, recomputes gate/up per row chunk."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor, bg: torch.Tensor | None,
                bu: torch.Tensor | None, bd: torch.Tensor | None, kernels: NormMLPKernels) -> torch.Tensor:
        x2 = _rows(x)
        out = torch.empty(x2.shape[0], wd.shape[0], dtype=x.dtype, device=x.device)
        for r in row_chunks(x2.shape[0], wg.shape[0], x2.device):
            gate, up = _gate_up(x2[r], wg, wu, bg, bu)
            out[r] = F.linear(kernels.swiglu_forward(gate, up), wd, bd)
        ctx.save_for_backward(x2, wg, wu, wd, bg, bu)
        ctx.kernels = kernels
        return out.view(*x.shape[:-1], wd.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x2, wg, wu, wd, bg, bu = ctx.saved_tensors
        g2 = _rows(grad)
        dx = torch.empty_like(x2)
        wd = wd.to(g2.dtype)  # once, not per chunk (a no-op when the grad has the weight's dtype)
        for r in row_chunks(x2.shape[0], wg.shape[0], x2.device):
            gate, up = _gate_up(x2[r], wg, wu, bg, bu)
            dgate, dup = ctx.kernels.swiglu_backward(torch.mm(g2[r], wd), gate, up)
            del gate, up
            dx[r] = torch.addmm(torch.mm(dgate, wg), dup, wu)
        return dx.view(grad.shape[:-1] + (x2.shape[1],)), None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------
# public entry points


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """Fused RMSNorm (HF semantics); gradients for x and, when it requires grad, the weight."""
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"RMSNorm weight of size {weight.shape[0]} does not match x's last dim {x.shape[-1]}")
    return RMSNormFunction.apply(x, weight, float(eps), kernels_for(backend, x.device))


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Fused silu(gate) * up with a backward that saves only gate and up."""
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    return SwiGLUFunction.apply(gate, up, kernels_for(backend, gate.device))


def frozen_mlp(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor,
               gate_b: torch.Tensor | None = None, up_b: torch.Tensor | None = None,
               down_b: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """SwiGLU MLP of a frozen layer: gradient for x only, saving x alone (gate/up recomputed in the backward)."""
    params = [t for t in (gate_w, up_w, down_w, gate_b, up_b, down_b) if t is not None]
    if any(t.requires_grad for t in params):
        raise ValueError("frozen_mlp computes no weight gradients: its weights and biases must not require grad")
    return FrozenMLPFunction.apply(x, gate_w, up_w, down_w, gate_b, up_b, down_b, kernels_for(backend, x.device))
