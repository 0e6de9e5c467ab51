"""Fused LM-head GRPO loss: log-probs, loss and dL/dhidden without ever allocating tokens x vocab.

In one-layer RL the LM head W (V x H) is frozen, so the backward needs only dH (N x H), never dW.
With z = h W^T / T, logp_t = z_t[y_t] - logsumexp(z_t) and g_t = dL/dlogp_t:

    dH_t = g_t / T * (W[y_t] - sum_v softmax(z_t)_v W_v)

The forward streams over (vocab chunk, token chunk) tiles with an online logsumexp; the backward
recomputes each tile, turns it into softmax * g / T and accumulates tile @ W_chunk. Peak extra memory
is one chunk_tokens x chunk_vocab tile plus O(N x H), whatever the vocabulary size.

Backends: chunked PyTorch (here; any device, used on CPU) and Triton (`grpo_loss_triton`, CUDA, or
CPU under TRITON_INTERPRET=1). `grpo_loss` picks one; SPARSELAYER_KERNELS=torch|triton overrides "auto".
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .grpo_loss_reference import accumulation_dtype, check_loss_inputs

DEFAULT_CHUNK_TOKENS = 1024
DEFAULT_CHUNK_VOCAB = 4096
BACKENDS = ("auto", "torch", "triton")
ENV_BACKEND = "SPARSELAYER_KERNELS"


@dataclass(frozen=True)
class LMHeadKernels:
    """The two primitives a backend supplies; everything else (loss, autograd) is shared."""

    # (hidden, weight, targets, temperature) -> (logsumexp (N,), target logit (N,)), both at temperature
    lse_and_target: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
    # (hidden, weight, targets, lse, dL/dlogp, temperature) -> dL/dhidden, hidden's shape and dtype
    grad_hidden: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


# ---------------------------------------------------------------------------------------------------
# chunked PyTorch primitives


def _scaled_hidden(hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """hidden / T in the accumulation dtype, so that each logit tile is one matmul."""
    h = hidden.to(accumulation_dtype(hidden))
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


def chunked_grad_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                        grad_logp: torch.Tensor, temperature: float, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                        chunk_vocab: int = DEFAULT_CHUNK_VOCAB) -> torch.Tensor:
    """dH = g/T * (W[y] - softmax(z) @ W), tile by tile; tokens with g == 0 (padding) cost nothing."""
    active = torch.nonzero(grad_logp).squeeze(1)
    n = hidden.shape[0]
    if active.numel() < n:  # compute on the weighted tokens only, scatter back at the end
        dh = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        if active.numel():
            dh[active] = chunked_grad_hidden(hidden[active], weight, targets[active], lse[active], grad_logp[active],
                                             temperature, chunk_tokens, chunk_vocab)
        return dh
    h = _scaled_hidden(hidden, temperature)
    scale = grad_logp.to(h.dtype) / temperature
    lse = lse.to(h.dtype)
    acc = weight[targets.long()].to(h.dtype).mul_(scale.unsqueeze(1))  # the one-hot part: g/T * W[y]
    for v0 in range(0, weight.shape[0], chunk_vocab):
        w = weight[v0 : v0 + chunk_vocab].to(h.dtype)
        for t0 in range(0, n, chunk_tokens):
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
        grad_hidden=functools.partial(chunked_grad_hidden, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab))


# ---------------------------------------------------------------------------------------------------
# the loss and its analytic derivative in logp (O(N), shared by all backends)


@dataclass(frozen=True)
class LossParams:
    """Scalar hyper-parameters of the GRPO loss."""

    epsilon: float
    epsilon_high: float
    beta: float
    temperature: float


def surrogate_and_grad(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                       token_weights: torch.Tensor, params: LossParams, ref_logp: torch.Tensor | None,
                       tis_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_t w_t * l_t, dL/dlogp (N,)) for the clipped surrogate [x tis] + beta * k3 KL.

    The derivative matches autograd on the reference: the surrogate passes -A r where the unclipped
    term is the minimum or the ratio lies inside the (closed) clip range, and 0 elsewhere.
    """
    dtype = logp.dtype
    ratio = torch.exp(logp - old_logp.to(dtype))
    adv = advantages.to(dtype)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - params.epsilon, 1 + params.epsilon_high) * adv
    per_token = -torch.min(unclipped, clipped)
    in_range = (ratio >= 1 - params.epsilon) & (ratio <= 1 + params.epsilon_high)
    grad = torch.where((unclipped <= clipped) | in_range, -unclipped, torch.zeros_like(unclipped))
    if tis_weights is not None:
        per_token = per_token * tis_weights.to(dtype)
        grad = grad * tis_weights.to(dtype)
    if params.beta > 0:
        delta = ref_logp.to(dtype) - logp
        per_token = per_token + params.beta * (torch.exp(delta) - delta - 1)
        grad = grad + params.beta * (1 - torch.exp(delta))
    w = token_weights.to(dtype)
    return (w * per_token).sum(), w * grad


class FusedGRPOLoss(torch.autograd.Function):
    """GRPO loss through a frozen LM head; gradient for hidden only (the weight never gets one)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, old_logp: torch.Tensor,
                advantages: torch.Tensor, token_weights: torch.Tensor, ref_logp: torch.Tensor | None,
                tis_weights: torch.Tensor | None, params: LossParams,
                kernels: LMHeadKernels) -> tuple[torch.Tensor, torch.Tensor]:
        lse, target_logit = kernels.lse_and_target(hidden, weight, targets, params.temperature)
        logp = target_logit - lse
        old = logp if old_logp is None else old_logp  # None: on-policy pass, ratio 1 (old = logp, detached)
        loss, grad_logp = surrogate_and_grad(logp, old, advantages, token_weights, params, ref_logp, tis_weights)
        ctx.save_for_backward(hidden, weight, targets, lse, grad_logp)
        ctx.temperature = params.temperature
        ctx.kernels = kernels
        return loss, logp

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_logp_out: torch.Tensor):
        hidden, weight, targets, lse, grad_logp = ctx.saved_tensors
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            g = grad_logp * grad_loss + grad_logp_out  # logp is an output too: honour its gradient
            grad_hidden = ctx.kernels.grad_hidden(hidden, weight, targets, lse, g, ctx.temperature)
        return grad_hidden, None, None, None, None, None, None, None, None, None


def _validate(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    """Shape checks shared by every entry point."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden (N, H) and weight (V, H), got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be ({hidden.shape[0]},), got {tuple(targets.shape)}")


def apply_fused_loss(kernels: LMHeadKernels, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     old_logp: torch.Tensor, advantages: torch.Tensor, token_weights: torch.Tensor, epsilon: float,
                     epsilon_high: float, beta: float, ref_logp: torch.Tensor | None, tis_weights: torch.Tensor | None,
                     temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Run FusedGRPOLoss with a given backend: the common body of every fused entry point."""
    _validate(hidden, weight, targets)
    check_loss_inputs(beta, ref_logp)
    params = LossParams(float(epsilon), float(epsilon_high), float(beta), float(temperature))
    return FusedGRPOLoss.apply(hidden, weight, targets, old_logp, advantages, token_weights, ref_logp, tis_weights,
                               params, kernels)


# ---------------------------------------------------------------------------------------------------
# public entry points


def fused_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS, chunk_vocab: int = DEFAULT_CHUNK_VOCAB) -> torch.Tensor:
    """log p(target) per token (N,) without gradient and without a tokens x vocab tensor (old/ref log-probs)."""
    _validate(hidden, weight, targets)
    with torch.no_grad():
        lse, target_logit = chunked_lse_and_target(hidden, weight, targets, temperature, chunk_tokens, chunk_vocab)
    return target_logit - lse


def fused_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, old_logp: torch.Tensor,
                    advantages: torch.Tensor, token_weights: torch.Tensor, epsilon: float, epsilon_high: float,
                    beta: float, ref_logp: torch.Tensor | None = None, tis_weights: torch.Tensor | None = None,
                    temperature: float = 1.0, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                    chunk_vocab: int = DEFAULT_CHUNK_VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """reference_grpo_loss computed by chunked PyTorch: (loss, logp) with memory O(tile + N x H), not O(N x V)."""
    return apply_fused_loss(torch_kernels(chunk_tokens, chunk_vocab), hidden, weight, targets, old_logp, advantages,
                            token_weights, epsilon, epsilon_high, beta, ref_logp, tis_weights, temperature)


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


def triton_available() -> bool:
    """True when the triton package imports (checked lazily, never at package import)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, old_logp: torch.Tensor,
              advantages: torch.Tensor, token_weights: torch.Tensor, epsilon: float, epsilon_high: float, beta: float,
              ref_logp: torch.Tensor | None = None, tis_weights: torch.Tensor | None = None, temperature: float = 1.0,
              backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Fused GRPO loss, dispatched: Triton kernels on CUDA tensors, chunked PyTorch elsewhere."""
    args = (hidden, weight, targets, old_logp, advantages, token_weights, epsilon, epsilon_high, beta, ref_logp,
            tis_weights, temperature)
    if resolve_backend(backend, hidden.device) == "triton":
        from .grpo_loss_triton import triton_grpo_loss

        return triton_grpo_loss(*args)
    return fused_grpo_loss(*args)


def logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
             backend: str = "auto") -> torch.Tensor:
    """Fused no-grad log-probs, dispatched like grpo_loss (for old-policy and reference passes)."""
    if resolve_backend(backend, hidden.device) == "triton":
        from .grpo_loss_triton import triton_logprobs

        return triton_logprobs(hidden, weight, targets, temperature)
    return fused_logprobs(hidden, weight, targets, temperature)
