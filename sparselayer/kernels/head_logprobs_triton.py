"""Triton primitives of the fused LM-head log-probs (same maths as the chunked PyTorch ones in head_logprobs.py).

Forward: one program per (block of BLOCK_N tokens, vocabulary split) loops over the split's vocab blocks;
each logit tile is tl.dot(hidden block, weight block) over H in BLOCK_K steps, folded into an online max /
sum-exp, and the target logit is picked from the tile that holds it; the splits' logsumexps are combined
afterwards (splits fill the GPU when there are few token blocks). Backward: a persistent grid whose programs walk
work items of (token block, group of vocab_blocks vocab blocks); per item a program recomputes each logit
tile once, stores d = g/T * (onehot - softmax) into its private cache slot (L2-sized, not tokens x vocab),
then for each BLOCK_H columns of dH sums cache tile @ W block over the group in registers and atomically
adds the sum into an fp32 dH buffer: cdiv(V, BLOCK_V * vocab_blocks) atomic adds per dH element (75 at
V = 151936 on a GPU) instead of one per vocab block (1187). Keeping the sum over the group in registers
without the cache would mean recomputing every logit tile once per BLOCK_H columns (H / BLOCK_H = 64x the
logit flops at H = 4096), and a BLOCK_N x H accumulator does not fit in registers.

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
# vocab_blocks: vocab blocks per work item of the backward (one atomic add per dH element per item); the
# interpreter's 2 keeps the loop over them and a ragged last group in the tests' small vocabularies.
GPU_BLOCKS = dict(block_n=64, block_v=128, block_k=64, block_h=64, vocab_blocks=16)
INTERPRETER_BLOCKS = dict(block_n=16, block_v=64, block_k=32, block_h=32, vocab_blocks=2)
# Persistent backward programs: per SM on a GPU (each holds a BLOCK_N x vocab_blocks * BLOCK_V cache slot),
# a few under the interpreter so that each program walks several work items in the tests.
BACKWARD_PROGRAMS_PER_SM = 2
INTERPRETER_BACKWARD_PROGRAMS = 3
# Warps per program: the fp32 tiles (FMA dots, 4-byte operands) spill registers at 4 warps on sm_90.
NUM_WARPS = {torch.float32: 8, torch.bfloat16: 4, torch.float16: 4}


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
def _lse_target_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, tgt_ptr, N, V, H, stride_h, stride_w, inv_temp, span,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Per (token block, vocabulary split of `span` columns): the logsumexp over the split (online max /
    sum-exp) and the target logit where the split holds it (0 elsewhere), into row program_id(1) of the
    (splits, N) outputs; the caller combines the splits."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    targets = tl.load(t_ptr + rows, mask=row_ok, other=0)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    picked = tl.zeros([BLOCK_N], dtype=tl.float32)
    start = tl.program_id(1) * span
    stop = tl.minimum(start + span, V)
    for v0 in range(start, stop, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        z = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, cols < stop, H, stride_h, stride_w, inv_temp,
                        BLOCK_N, BLOCK_V, BLOCK_K, PRECISION, UPCAST)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        hit = (cols[None, :] == targets[:, None]) & (cols < stop)[None, :]
        picked += tl.sum(tl.where(hit, z, 0.0), axis=1)
    out = tl.program_id(1).to(tl.int64) * N + rows
    tl.store(lse_ptr + out, m + tl.log(s), mask=row_ok)
    tl.store(tgt_ptr + out, picked, mask=row_ok)


@triton.jit
def _cache_d_tiles(h_ptr, w_ptr, cache_ptr, rows, row_ok, targets, lse, scale, block0, n_blocks, V, H, stride_h,
                   stride_w, inv_temp, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Tile j of the cache = (g/T * (onehot - softmax))[rows, vocab block block0 + j] in the weight's dtype.

    Each logit tile is computed once (full H); the dot of the second pass reads it back from the cache.
    """
    tile = tl.arange(0, BLOCK_N)[:, None] * BLOCK_V + tl.arange(0, BLOCK_V)[None, :]
    for j in range(0, n_blocks):
        cols = ((block0 + j) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        z = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, cols < V, H, stride_h, stride_w, inv_temp,
                        BLOCK_N, BLOCK_V, BLOCK_K, PRECISION, UPCAST)
        onehot = tl.where(cols[None, :] == targets[:, None], 1.0, 0.0)
        d = scale[:, None] * (onehot - tl.exp(z - lse[:, None]))
        tl.store(cache_ptr + j * (BLOCK_N * BLOCK_V) + tile, d.to(cache_ptr.dtype.element_ty))


@triton.jit
def _add_cached_d_times_w(w_ptr, cache_ptr, dh_ptr, rows, row_ok, block0, n_blocks, V, H, stride_w,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                          PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dH[rows] += sum_j cache tile j @ W[vocab block block0 + j]: per BLOCK_H columns, one register accumulator
    over the item's vocab blocks and one atomic add (not one per vocab block)."""
    tile = tl.arange(0, BLOCK_N)[:, None] * BLOCK_V + tl.arange(0, BLOCK_V)[None, :]
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        acc = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
        for j in range(0, n_blocks):
            cols = ((block0 + j) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
            d = tl.load(cache_ptr + j * (BLOCK_N * BLOCK_V) + tile)
            w = tl.load(w_ptr + cols[:, None] * stride_w + hs[None, :], mask=(cols < V)[:, None] & h_ok[None, :],
                        other=0.0)
            if UPCAST:  # exact, as in _logit_tile
                d = d.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(d, w, acc, input_precision=PRECISION)
        tl.atomic_add(dh_ptr + rows[:, None] * H + hs[None, :], acc, mask=row_ok[:, None] & h_ok[None, :],
                      sem="relaxed")  # only the sum matters: no ordering between the adds is needed


@triton.jit
def _grad_hidden_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, g_ptr, dh_ptr, cache_ptr, N, V, H, stride_h, stride_w,
                        inv_temp, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_H: tl.constexpr, VOCAB_BLOCKS: tl.constexpr, PRECISION: tl.constexpr,
                        UPCAST: tl.constexpr):
    """dH += (g/T * (onehot - softmax)) @ W, persistent: each program walks work items (a token block and a
    group of VOCAB_BLOCKS vocab blocks, the last group ragged), token blocks fastest so that programs running
    together read the same weight rows. Per item: its d tiles into the program's private cache slot, then one
    atomic add per dH element (cdiv(V, BLOCK_V * VOCAB_BLOCKS) adds per element in all)."""
    pid = tl.program_id(0)
    token_blocks = tl.cdiv(N, BLOCK_N)
    vocab_blocks = tl.cdiv(V, BLOCK_V)
    cache = cache_ptr + pid.to(tl.int64) * (VOCAB_BLOCKS * BLOCK_N * BLOCK_V)
    for item in range(pid, token_blocks * tl.cdiv(vocab_blocks, VOCAB_BLOCKS), tl.num_programs(0)):
        rows = ((item % token_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        block0 = (item // token_blocks) * VOCAB_BLOCKS
        n_blocks = tl.minimum(vocab_blocks - block0, VOCAB_BLOCKS)
        row_ok = rows < N
        targets = tl.load(t_ptr + rows, mask=row_ok, other=0)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        scale = tl.load(g_ptr + rows, mask=row_ok, other=0.0) * inv_temp
        _cache_d_tiles(h_ptr, w_ptr, cache, rows, row_ok, targets, lse, scale, block0, n_blocks, V, H, stride_h,
                       stride_w, inv_temp, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION, UPCAST)
        tl.debug_barrier()  # the cache tiles are read by other threads of the program than wrote them
        _add_cached_d_times_w(w_ptr, cache, dh_ptr, rows, row_ok, block0, n_blocks, V, H, stride_w,
                              BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, UPCAST)
        tl.debug_barrier()  # ... and rewritten by the next item only after every thread has read them


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
    b = _blocks()
    token_blocks, vocab_blocks = triton.cdiv(n, b["block_n"]), triton.cdiv(v, b["block_v"])
    splits = _forward_splits(h.device, token_blocks, vocab_blocks)
    span = triton.cdiv(vocab_blocks, splits) * b["block_v"]
    splits = triton.cdiv(v, span)  # no empty split
    lse = torch.empty(splits, n, dtype=torch.float32, device=h.device)
    tgt = torch.empty(splits, n, dtype=torch.float32, device=h.device)
    if n:
        _lse_target_kernel[(token_blocks, splits)](
            h, w, ops.targets, lse, tgt, n, v, hdim, h.stride(0), w.stride(0), 1.0 / temperature, span,
            BLOCK_N=b["block_n"], BLOCK_V=b["block_v"], BLOCK_K=b["block_k"], PRECISION=ops.precision,
            UPCAST=ops.upcast, num_warps=NUM_WARPS[w.dtype])
    return torch.logsumexp(lse, dim=0), tgt.sum(dim=0)


def _forward_splits(device: torch.device, token_blocks: int, vocab_blocks: int) -> int:
    """Vocabulary splits of the forward: enough (token block, split) programs to fill the GPU twice over when
    there are few token blocks (one program per token block alone leaves SMs idle below 8k tokens); two under
    the interpreter, so that the tests combine splits."""
    if INTERPRETED:
        return min(2, vocab_blocks)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(vocab_blocks, triton.cdiv(2 * sms, token_blocks)))


def _backward_programs(device: torch.device, items: int) -> int:
    """Persistent programs of the backward: enough to fill the GPU, never more than there are work items."""
    if INTERPRETED:
        return min(items, INTERPRETER_BACKWARD_PROGRAMS)
    return min(items, torch.cuda.get_device_properties(device).multi_processor_count * BACKWARD_PROGRAMS_PER_SM)


def triton_grad_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                       grad_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """dL/dhidden from saved logsumexp and dL/dlogp, by the backward kernel (fp32 atomics, then hidden's dtype).

    Besides dH it allocates one d-tile cache slot per program (BLOCK_N x vocab_blocks * BLOCK_V in the
    weight's dtype: 256 KiB for 16-bit, 512 KiB for fp32 on a GPU), not a tokens x vocab tensor.
    """
    ops = _prepare(hidden, weight, targets)
    h, w = ops.hidden, ops.weight
    (n, hdim), v = h.shape, w.shape[0]
    dh = torch.zeros(n, hdim, dtype=torch.float32, device=h.device)
    b = _blocks()
    if n:
        tile = b["block_n"] * b["vocab_blocks"] * b["block_v"]
        items = triton.cdiv(n, b["block_n"]) * triton.cdiv(triton.cdiv(v, b["block_v"]), b["vocab_blocks"])
        programs = _backward_programs(h.device, items)
        cache = torch.empty(programs, tile, dtype=w.dtype, device=h.device)
        _grad_hidden_kernel[(programs,)](
            h, w, ops.targets, lse.float().contiguous(), grad_logp.float().contiguous(), dh, cache, n, v, hdim,
            h.stride(0), w.stride(0), 1.0 / temperature, BLOCK_N=b["block_n"], BLOCK_V=b["block_v"],
            BLOCK_K=b["block_k"], BLOCK_H=b["block_h"], VOCAB_BLOCKS=b["vocab_blocks"], PRECISION=ops.precision,
            UPCAST=ops.upcast, num_warps=NUM_WARPS[w.dtype])
    return dh.to(hidden.dtype)


@functools.lru_cache(maxsize=1)
def triton_kernels() -> LMHeadKernels:
    """The Triton backend as an LMHeadKernels pair."""
    return LMHeadKernels(lse_and_target=triton_lse_and_target, grad_hidden=triton_grad_hidden, skip_zero_grad=False)
