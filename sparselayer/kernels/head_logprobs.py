"""Fused LM-head log-probs: hidden (N, H) -> log p(target) (N,) without ever allocating tokens x vocab.

In one-layer RL the LM head W (V x H) is frozen, so the backward needs only dH (N x H), never dW.
With z = h W^T / T, logp_t = z_t[y_t] - logsumexp(z_t) and g_t = dL/dlogp_t (from any loss, by autograd):

    dH_t = g_t / T * (W[y_t] - sum_v softmax(z_t)_v W_v)

Chunked PyTorch backend (here; any device, the CPU default). When hidden requires grad, its forward streams
over (vocab chunk, token chunk) tiles once and keeps, beside the logsumexp, the two things the backward
needs: the off-target mass q_t = 1 - softmax(z_t)[y_t] and the off-target mean M_t = sum_{v != y_t}
softmax(z_t)_v W_v (N x H, accumulated flash-style with the online maximum). Then

    dH_t = g_t / T * ((1 - p_t) W[y_t] - M_t) = g_t / T * (q_t W[y_t] - M_t)

is elementwise: forward + backward cost two tokens x vocab x hidden matmuls, as the materialized path does,
instead of three (forward, then recompute and dH). The target column is left out of M and q so that a
confident token (p_t near 1) loses no precision to cancellation. No-grad passes (old policy, reference) keep
only the logsumexp (one matmul). On CUDA, 16-bit inputs run the matmuls in their own dtype (tensor cores,
logits rounded as the model's own LM head rounds them; softmax and sums in float32); float32 inputs and
the CPU run them in float32. Peak extra memory is one chunk_tokens x chunk_vocab tile plus O(N x H),
whatever the vocabulary size.

Triton backend (`head_logprobs_triton`, CUDA, or CPU under TRITON_INTERPRET=1): logsumexp forward, tiled
recompute backward. The backends supply `LMHeadKernels` primitives; the autograd Function is shared.
Reference: `head_logprobs_reference.reference_logprobs`.
"""
from __future__ import annotations

import functools
import math

import torch

from .backend import HeadForward, LMHeadKernels, accumulation_dtype, resolve_backend

DEFAULT_CHUNK_TOKENS = 1024
DEFAULT_CHUNK_VOCAB = 4096
# On CUDA larger tiles (128 MiB of float32 logits): each tile is a handful of kernel launches, and at 4k x 1k
# tiles the launches of a 152k vocabulary would cost about as much as its matmuls
CUDA_CHUNK_TOKENS = 2048
CUDA_CHUNK_VOCAB = 16384


# ---------------------------------------------------------------------------------------------------
# chunked PyTorch primitives


def matmul_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype of the logit and mean matmuls: 16-bit inputs keep theirs on CUDA (tensor cores); everything
    else runs in the accumulation dtype (float32, or float64 for float64 inputs)."""
    if hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16):
        return hidden.dtype
    return accumulation_dtype(hidden)


def _scaled_hidden(hidden: torch.Tensor, temperature: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """hidden / T in `dtype` (default: the accumulation dtype), so that each logit tile is one matmul."""
    h = hidden.to(dtype or accumulation_dtype(hidden))
    return h if temperature == 1.0 else h * (1.0 / temperature)


def _tile_logsumexp_(z: torch.Tensor) -> torch.Tensor:
    """Row logsumexp of a logit tile, computed in place (z is overwritten with exp(z - max))."""
    m = z.amax(dim=1)
    z.sub_(m.unsqueeze(1)).exp_()
    return m + z.sum(dim=1).log()


def _target_logits(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """z_t[y_t] = h_t . W[y_t] for each token (h already scaled by 1/T), chunked over tokens."""
    out = torch.empty(h.shape[0], dtype=h.dtype, device=h.device)
    for t0 in range(0, h.shape[0], chunk_tokens):
        rows = weight[targets[t0 : t0 + chunk_tokens].long()].to(h.dtype)
        out[t0 : t0 + chunk_tokens] = (h[t0 : t0 + chunk_tokens] * rows).sum(dim=1)
    return out


def chunked_lse_and_target(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                           chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                           chunk_vocab: int = DEFAULT_CHUNK_VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """Online logsumexp over vocab chunks (each tile chunk_tokens x chunk_vocab) plus the target logit."""
    h = _scaled_hidden(hidden, temperature)
    lse = torch.full((h.shape[0],), -math.inf, dtype=h.dtype, device=h.device)
    for v0 in range(0, weight.shape[0], chunk_vocab):
        w = weight[v0 : v0 + chunk_vocab].to(h.dtype)
        for t0 in range(0, h.shape[0], chunk_tokens):
            tile_lse = _tile_logsumexp_(torch.mm(h[t0 : t0 + chunk_tokens], w.T))
            lse[t0 : t0 + chunk_tokens] = torch.logaddexp(lse[t0 : t0 + chunk_tokens], tile_lse)
    return lse, _target_logits(h, weight, targets, chunk_tokens)


def _without_target(z: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """The tile with each row's target column (where it falls in the tile) set to -inf, in place and without a
    device sync (no nonzero): rows whose target lies elsewhere write their own value back."""
    inside = (column >= 0) & (column < z.shape[1])
    index = column.clamp(0, z.shape[1] - 1).unsqueeze(1)
    keep = z.gather(1, index).squeeze(1)
    return z.scatter_(1, index, torch.where(inside, torch.full_like(keep, -math.inf), keep).unsqueeze(1))


def chunked_lse_target_and_mean(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                temperature: float, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                                chunk_vocab: int = DEFAULT_CHUNK_VOCAB) -> HeadForward:
    """One pass over the tiles giving the logsumexp, the target logit, the off-target mass q (N,) and the
    off-target mean M (N, H), all float32 (float64 for float64 inputs): what the elementwise backward needs."""
    acc, mm = accumulation_dtype(hidden), matmul_dtype(hidden)
    h = _scaled_hidden(hidden, temperature, mm)
    n, vocab = h.shape[0], weight.shape[0]
    y = targets.long()
    target = _target_logits(h.to(acc), weight, targets, chunk_tokens)
    run_max = torch.full((n,), -math.inf, dtype=acc, device=h.device)
    run_sum = torch.zeros(n, dtype=acc, device=h.device)
    mean = torch.zeros(n, h.shape[1], dtype=acc, device=h.device)
    for v0 in range(0, vocab, chunk_vocab):
        w = weight[v0 : v0 + chunk_vocab].to(mm)
        for t0 in range(0, n, chunk_tokens):
            t1 = t0 + chunk_tokens
            z = _without_target(torch.mm(h[t0:t1], w.T).to(acc), y[t0:t1] - v0)
            new_max = torch.maximum(run_max[t0:t1], z.amax(dim=1))
            shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            rescale = (run_max[t0:t1] - shift).exp_()
            z.sub_(shift.unsqueeze(1)).exp_()
            run_sum[t0:t1] = run_sum[t0:t1] * rescale + z.sum(dim=1)
            mean[t0:t1].mul_(rescale.unsqueeze(1)).add_(torch.mm(z.to(mm), w).to(acc))
            run_max[t0:t1] = new_max
            del z  # free the tile before the next one is allocated
    top = torch.maximum(run_max, target)  # the target joins the sum last, outside q and M
    off = run_sum * (run_max - top).exp()
    total = off + (target - top).exp()
    mean.mul_(((run_max - top).exp() / total).unsqueeze(1))
    return HeadForward(top + total.log(), target, off / total, mean)


def chunked_grad_from_mean(weight: torch.Tensor, targets: torch.Tensor, off_mass: torch.Tensor, mean: torch.Tensor,
                           grad_logp: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """dH = g/T * (q W[y] - M): elementwise on the off-target mass q and mean M the one-pass forward kept."""
    scale = grad_logp.to(mean.dtype).unsqueeze(1) / temperature
    rows = weight[targets.long()].to(mean.dtype)
    return ((off_mass.unsqueeze(1) * rows).sub_(mean)).mul_(scale).to(dtype)


def chunked_grad_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                        grad_logp: torch.Tensor, temperature: float, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                        chunk_vocab: int = DEFAULT_CHUNK_VOCAB) -> torch.Tensor:
    """dH = g/T * (W[y] - softmax(z) @ W), recomputing z tile by tile (one tile alive at a time)."""
    h = _scaled_hidden(hidden, temperature)
    scale = grad_logp.to(h.dtype) / temperature
    lse = lse.to(h.dtype)
    acc = weight[targets.long()].to(h.dtype).mul_(scale.unsqueeze(1))  # the one-hot part: g/T * W[y]
    for v0 in range(0, weight.shape[0], chunk_vocab):
        w = weight[v0 : v0 + chunk_vocab].to(h.dtype)
        for t0 in range(0, h.shape[0], chunk_tokens):
            t1 = t0 + chunk_tokens
            p = torch.mm(h[t0:t1], w.T).sub_(lse[t0:t1].unsqueeze(1)).exp_().mul_(scale[t0:t1].unsqueeze(1))
            acc[t0:t1].addmm_(p, w, alpha=-1.0)
            del p  # free the tile before the next one is allocated
    return acc.to(hidden.dtype)


def torch_kernels(chunk_tokens: int = DEFAULT_CHUNK_TOKENS, chunk_vocab: int = DEFAULT_CHUNK_VOCAB) -> LMHeadKernels:
    """The chunked PyTorch backend with the given tile size."""
    if chunk_tokens < 1 or chunk_vocab < 1:
        raise ValueError("chunk_tokens and chunk_vocab must be positive")
    return LMHeadKernels(
        lse_and_target=functools.partial(chunked_lse_and_target, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab),
        grad_hidden=functools.partial(chunked_grad_hidden, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab),
        lse_target_and_mean=functools.partial(chunked_lse_target_and_mean, chunk_tokens=chunk_tokens,
                                              chunk_vocab=chunk_vocab))


def head_kernels(backend: str, device: torch.device) -> LMHeadKernels:
    """The primitives of `backend` ('auto' | 'torch' | 'triton') on `device`; Triton is imported only here."""
    if resolve_backend(backend, device) == "triton":
        from .head_logprobs_triton import triton_kernels

        return triton_kernels()
    return torch_kernels(CUDA_CHUNK_TOKENS, CUDA_CHUNK_VOCAB) if device.type == "cuda" else torch_kernels()


# ---------------------------------------------------------------------------------------------------
# autograd Function (shared by the backends)


def _grad_active_tokens(kernels: LMHeadKernels, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        lse: torch.Tensor, grad_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """dL/dhidden computed on the tokens with a nonzero gradient only and scattered back: padding costs nothing
    (for backends with `skip_zero_grad`; the others run every token)."""
    if not kernels.skip_zero_grad:
        return kernels.grad_hidden(hidden, weight, targets, lse, grad_logp, temperature)
    active = torch.nonzero(grad_logp).squeeze(1)
    if active.numel() == grad_logp.numel():
        return kernels.grad_hidden(hidden, weight, targets, lse, grad_logp, temperature)
    dh = torch.zeros_like(hidden)
    if active.numel():
        dh[active] = kernels.grad_hidden(hidden[active], weight, targets[active], lse[active], grad_logp[active],
                                         temperature)
    return dh


class HeadLogprobsFunction(torch.autograd.Function):
    """hidden (N, H) -> logp (N,) through a frozen head. Saves the logsumexp (N,) beyond the inputs, plus the
    off-target mass and mean (N,), (N, H) where the backend computes them (then the backward is elementwise)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                kernels: LMHeadKernels) -> torch.Tensor:
        ctx.temperature, ctx.kernels, ctx.hidden_dtype = temperature, kernels, hidden.dtype
        ctx.elementwise = ctx.needs_input_grad[0] and kernels.lse_target_and_mean is not None
        if ctx.elementwise:
            saved = kernels.lse_target_and_mean(hidden, weight, targets, temperature)
            ctx.save_for_backward(weight, targets, saved.off_mass, saved.mean)
            return saved.target - saved.lse
        lse, target_logit = kernels.lse_and_target(hidden, weight, targets, temperature)
        ctx.save_for_backward(hidden, weight, targets, lse)
        return target_logit - lse

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor):
        grad_hidden = None
        if ctx.needs_input_grad[0] and ctx.elementwise:
            weight, targets, off_mass, mean = ctx.saved_tensors
            grad_hidden = chunked_grad_from_mean(weight, targets, off_mass, mean, grad_logp, ctx.temperature,
                                                 ctx.hidden_dtype)
        elif ctx.needs_input_grad[0]:
            hidden, weight, targets, lse = ctx.saved_tensors
            grad_hidden = _grad_active_tokens(ctx.kernels, hidden, weight, targets, lse, grad_logp.contiguous(),
                                              ctx.temperature)
        return grad_hidden, None, None, None, None


# ---------------------------------------------------------------------------------------------------
# entry points


def check_head_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    """Shapes (hidden (N, H), weight (V, H), targets (N,)) and a frozen weight whenever autograd records."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden (N, H) and weight (V, H), got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("the fused LM head computes no weight gradient: the head weight must not require grad "
                         "(freeze it, or use reference_logprobs for a trained head)")


def head_logprobs_with(kernels: LMHeadKernels, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """`head_logprobs` with given primitives (e.g. the chunked backend at a chosen tile size)."""
    check_head_inputs(hidden, weight, targets)
    return HeadLogprobsFunction.apply(hidden, weight, targets, float(temperature), kernels)


def head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                  backend: str = "auto") -> torch.Tensor:
    """log softmax(hidden @ weight.T / temperature)[targets] (N,), float32 (float64 for float64 hidden).

    Differentiable in `hidden` only: the head weight is frozen, and a weight that requires grad is a
    ValueError while grad mode is on. No tokens x vocab tensor is built in the forward or the backward.
    """
    return head_logprobs_with(head_kernels(backend, hidden.device), hidden, weight, targets, temperature)
