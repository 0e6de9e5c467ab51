"""Triton kernels for fused RMSNorm and SwiGLU (same maths as the chunked PyTorch path in norm_mlp.py).

RMSNorm forward: one program per block of rows holds whole rows (BLOCK_H >= H), computes rstd in fp32
and writes y and rstd. Backward: each program walks a contiguous range of rows, writes dx row by row
and, for a trained weight, keeps a private fp32 dW partial that is summed over programs afterwards
(no atomics, deterministic). SwiGLU: elementwise over the flattened tensors, silu recomputed in the
backward from gate.

Imports triton at import time; under TRITON_INTERPRET=1 (set before this module is first imported)
the kernels run on CPU tensors, which is how the tests check them on a machine without a GPU.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .backend import NormMLPKernels
from .triton_common import INTERPRETED, check_operand

# Elements per program: rows x BLOCK_H for the norm, a flat block for SwiGLU. Small under the interpreter.
NORM_TILE = 1024 if INTERPRETED else 8192
ELEMENTWISE_BLOCK = 1024 if INTERPRETED else 4096
MAX_NORM_PROGRAMS = 4 if INTERPRETED else 512
# Warps of the backward programs: at Triton's default 4 they spill registers on sm_90 (SwiGLU at BLOCK=4096,
# the norm at every width); 8 for SwiGLU and narrow norms, up to 32 for the widest rows (BLOCK_H >= 16384).
ELEMENTWISE_BACKWARD_WARPS = 8


@triton.jit
def _rms_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, N, H, eps,
                        BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """y = w * cast(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps), for BLOCK_N whole rows."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    row_ok, col_ok = rows < N, cols < H
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * H + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / H + eps)
    xhat = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (w[None, :] * xhat).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _rms_backward_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, N, H, rows_per_program,
                         BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, NEED_DW: tl.constexpr):
    """dx for rows [pid * rows_per_program, +rows_per_program); with NEED_DW, this program's dW partial."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < H
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    start = pid * rows_per_program
    for r0 in range(start, start + rows_per_program, BLOCK_N):
        rows = (r0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < N
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * H + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        mean_gx = tl.sum(g * xhat, axis=1) / H
        dx = rstd[:, None] * (g - xhat * mean_gx[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw += tl.sum(dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)
    if NEED_DW:
        tl.store(dw_ptr + pid * H + cols, dw, mask=col_ok)


@triton.jit
def _swiglu_forward_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = silu(gate) * up over one flat block, in fp32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_backward_kernel(d_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    """d gate = d * up * sig * (1 + gate * (1 - sig)), d up = d * silu(gate), over one flat block."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    d = tl.load(d_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(du_ptr + offs, (d * g * sig).to(du_ptr.dtype.element_ty), mask=ok)
    tl.store(dg_ptr + offs, (d * u * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=ok)


def _check(*tensors: torch.Tensor) -> None:
    """Dtypes Triton handles here, and a device it can run on."""
    for t in tensors:
        check_operand(t.dtype, t.device)


def _norm_blocks(h: int) -> tuple[int, int]:
    """(BLOCK_N rows, BLOCK_H >= h columns) of one norm program."""
    block_h = triton.next_power_of_2(h)
    return max(1, NORM_TILE // block_h), block_h


def _norm_backward_warps(block_h: int) -> int:
    """Warps of the norm backward: 8, 16 at BLOCK_H = 8192, 32 from 16384 (no sm_90 spills up to 8192)."""
    return min(32, max(8, block_h // 512))


def triton_rms_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd fp32) of a contiguous (N, H) x by the forward kernel."""
    _check(x, weight)
    n, h = x.shape
    y = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    block_n, block_h = _norm_blocks(h)
    if n:
        _rms_forward_kernel[(triton.cdiv(n, block_n),)](x, weight.contiguous(), y, rstd, n, h, eps,
                                                        BLOCK_N=block_n, BLOCK_H=block_h)
    return y, rstd


def triton_rms_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                        need_dw: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx, dw fp32 or None) by the backward kernel; dW partials of the programs are summed here."""
    _check(dy, x, weight)
    n, h = x.shape
    block_n, block_h = _norm_blocks(h)
    programs = max(1, min(MAX_NORM_PROGRAMS, triton.cdiv(n, block_n)))
    rows_per_program = triton.cdiv(triton.cdiv(n, programs), block_n) * block_n
    programs = max(1, triton.cdiv(n, rows_per_program))
    dx = torch.empty_like(x)
    partial = torch.zeros(programs if need_dw else 1, h, dtype=torch.float32, device=x.device)
    if n:
        _rms_backward_kernel[(programs,)](dy.contiguous(), x, weight.contiguous(), rstd.float().contiguous(), dx,
                                          partial, n, h, rows_per_program, BLOCK_N=block_n, BLOCK_H=block_h,
                                          NEED_DW=need_dw, num_warps=_norm_backward_warps(block_h))
    return dx, partial.sum(0) if need_dw else None


def triton_swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up by the elementwise kernel."""
    _check(gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _swiglu_forward_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](gate, up, out, n, BLOCK=ELEMENTWISE_BLOCK)
    return out


def triton_swiglu_backward(grad: torch.Tensor, gate: torch.Tensor,
                           up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) by the elementwise backward kernel."""
    _check(grad, gate, up)
    grad, gate, up = grad.contiguous(), gate.contiguous(), up.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _swiglu_backward_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](grad, gate, up, dgate, dup, n,
                                                                      BLOCK=ELEMENTWISE_BLOCK,
                                                                      num_warps=ELEMENTWISE_BACKWARD_WARPS)
    return dgate, dup


@functools.lru_cache(maxsize=1)
def triton_norm_mlp_kernels() -> NormMLPKernels:
    """The Triton backend as NormMLPKernels."""
    return NormMLPKernels(triton_rms_forward, triton_rms_backward, triton_swiglu_forward, triton_swiglu_backward)
