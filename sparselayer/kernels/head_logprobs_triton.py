"""Triton primitives of the fused LM-head log-probs (same maths as the chunked PyTorch ones in head_logprobs.py).

Forward: one program per block of BLOCK_N tokens loops over vocab blocks; each logit tile is
tl.dot(hidden block, weight block) over H in BLOCK_K steps, folded into an online max / sum-exp, and
the target logit is picked from the tile that holds it. Backward: one program per (token block, vocab
block) recomputes its logit tile, forms d = g/T * (onehot - softmax) and atomically adds d @ W_block
into an fp32 dH buffer, BLOCK_H columns at a time; no tokens x vocab tensor exists at any point.

Imports triton at import time; `head_logprobs.head_kernels` imports it only when the Triton backend is
chosen. On CPU it runs under the interpreter: TRITON_INTERPRET=1 must be set before this module is first
imported (the kernels are built when it is).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .backend import LMHeadKernels
from .triton_common import INTERPRETED, check_operand

# Tile sizes: tl.dot needs every dimension >= 16. GPU defaults; the interpreter is fastest with small ones.
GPU_BLOCKS = dict(block_n=64, block_v=128, block_k=64, block_h=64)
INTERPRETER_BLOCKS = dict(block_n=16, block_v=64, block_k=32, block_h=32)


@triton.jit
def _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, inv_temp,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                UPCAST: tl.constexpr):
    """z = h[rows] @ w[cols].T / T as a BLOCK_N x BLOCK_V fp32 tile; masked columns are -inf."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:  # exact: products of 16-bit floats are exact in fp32
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    return tl.where(col_ok[None, :], acc * inv_temp, float("-inf"))


@triton.jit
def _lse_target_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, tgt_ptr, N, V, H, stride_h, stride_w, inv_temp,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Per token block: logsumexp over all vocab blocks (online max / sum-exp) and the target logit."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    targets = tl.load(t_ptr + rows, mask=row_ok, other=0)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    picked = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        z = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, cols < V, H, stride_h, stride_w, inv_temp,
                        BLOCK_N, BLOCK_V, BLOCK_K, PRECISION, UPCAST)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        picked += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
    tl.store(lse_ptr + rows, m + tl.log(s), mask=row_ok)
    tl.store(tgt_ptr + rows, picked, mask=row_ok)


@triton.jit
def _grad_hidden_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, g_ptr, dh_ptr, N, V, H, stride_h, stride_w, inv_temp,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dH[rows] += (g/T * (onehot - softmax))[rows, cols] @ W[cols] for one (token, vocab) block pair."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    row_ok = rows < N
    col_ok = cols < V
    targets = tl.load(t_ptr + rows, mask=row_ok, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(g_ptr + rows, mask=row_ok, other=0.0) * inv_temp
    z = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, inv_temp,
                    BLOCK_N, BLOCK_V, BLOCK_K, PRECISION, UPCAST)
    onehot = tl.where(cols[None, :] == targets[:, None], 1.0, 0.0)
    d = scale[:, None] * (onehot - tl.exp(z - lse[:, None]))
    d = d.to(w_ptr.dtype.element_ty)  # the dot runs in the weight's dtype (tensor cores for 16-bit)
    if UPCAST:
        d = d.to(tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        w = tl.load(w_ptr + cols[:, None] * stride_w + hs[None, :], mask=col_ok[:, None] & h_ok[None, :], other=0.0)
        if UPCAST:
            w = w.to(tl.float32)
        part = tl.dot(d, w, input_precision=PRECISION)
        tl.atomic_add(dh_ptr + rows[:, None] * H + hs[None, :], part, mask=row_ok[:, None] & h_ok[None, :])


def _blocks() -> dict[str, int]:
    """Tile sizes for this run: small under the interpreter, larger on a GPU."""
    return INTERPRETER_BLOCKS if INTERPRETED else GPU_BLOCKS


@dataclass(frozen=True)
class _Operands:
    """Kernel-ready operands: contiguous hidden and weight of one dtype, int64 targets, dot settings."""

    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    precision: str  # tl.dot input precision: "ieee" whenever the dot runs in fp32
    upcast: bool  # dot 16-bit tiles in fp32: the interpreter's tl.dot reads bf16 as raw uint16


def _prepare(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> _Operands:
    """Check device and dtype, promote hidden and weight to one dtype tl.dot accepts, pick dot settings."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    check_operand(dtype, hidden.device)
    upcast = INTERPRETED and dtype != torch.float32
    precision = "ieee" if dtype == torch.float32 or upcast else "tf32"  # "tf32" is ignored for 16-bit dots
    return _Operands(hidden.to(dtype).contiguous(), weight.to(dtype).contiguous(), targets.long().contiguous(),
                     precision, upcast)


def triton_lse_and_target(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp, target logit) per token at the temperature, fp32, by the forward kernel."""
    ops = _prepare(hidden, weight, targets)
    h, w = ops.hidden, ops.weight
    (n, hdim), v = h.shape, w.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=h.device)
    tgt = torch.empty(n, dtype=torch.float32, device=h.device)
    b = _blocks()
    if n:
        _lse_target_kernel[(triton.cdiv(n, b["block_n"]),)](
            h, w, ops.targets, lse, tgt, n, v, hdim, h.stride(0), w.stride(0), 1.0 / temperature,
            BLOCK_N=b["block_n"], BLOCK_V=b["block_v"], BLOCK_K=b["block_k"], PRECISION=ops.precision,
            UPCAST=ops.upcast)
    return lse, tgt


def triton_grad_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                       grad_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """dL/dhidden from saved logsumexp and dL/dlogp, by the backward kernel (fp32 atomics, then hidden's dtype)."""
    ops = _prepare(hidden, weight, targets)
    h, w = ops.hidden, ops.weight
    (n, hdim), v = h.shape, w.shape[0]
    dh = torch.zeros(n, hdim, dtype=torch.float32, device=h.device)
    b = _blocks()
    if n:
        grid = (triton.cdiv(n, b["block_n"]), triton.cdiv(v, b["block_v"]))
        _grad_hidden_kernel[grid](
            h, w, ops.targets, lse.float().contiguous(), grad_logp.float().contiguous(), dh, n, v, hdim,
            h.stride(0), w.stride(0), 1.0 / temperature, BLOCK_N=b["block_n"], BLOCK_V=b["block_v"],
            BLOCK_K=b["block_k"], BLOCK_H=b["block_h"], PRECISION=ops.precision, UPCAST=ops.upcast)
    return dh.to(hidden.dtype)


@functools.lru_cache(maxsize=1)
def triton_kernels() -> LMHeadKernels:
    """The Triton backend as an LMHeadKernels pair."""
    return LMHeadKernels(lse_and_target=triton_lse_and_target, grad_hidden=triton_grad_hidden, skip_zero_grad=False)
