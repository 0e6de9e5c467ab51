"""The chunked PyTorch LM head's one-pass forward (logsumexp, off-target mass and mean) and its elementwise
backward, against autograd through materialized float64 logits, on fresh random inputs: float32 within
1e-5, 16-bit matmuls (the CUDA path, forced here on CPU) within 1e-2; no matmul in the backward."""
from __future__ import annotations

import dataclasses
import importlib
import math

import pytest
import torch

from sparselayer.kernels import reference_logprobs
from sparselayer.kernels.head_logprobs import (
    chunked_lse_and_target,
    chunked_lse_target_and_mean,
    head_logprobs_with,
    torch_kernels,
)

head_module = importlib.import_module("sparselayer.kernels.head_logprobs")


def _inputs(seed: int, n: int, hidden: int, vocab: int, dtype: torch.dtype, logit_scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * logit_scale / math.sqrt(hidden)).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    upstream = torch.randn(n, generator=g) * (torch.rand(n, generator=g) > 0.25)  # zeros: padding
    return h, w, targets, upstream


def _reference(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, upstream: torch.Tensor, temperature: float):
    h64 = h.double().requires_grad_()
    logp = reference_logprobs(h64, w.double(), targets, temperature)
    logp.backward(upstream.double())
    return logp.detach(), h64.grad


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all()
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("one_pass", [True, False])  # False: the recomputing backward (bench_grpo_loss's A/B)
@pytest.mark.parametrize("chunks", [(5, 7), (64, 1000), (1, 1)])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_one_pass_matches_float64_autograd(chunks, temperature, one_pass):
    h, w, targets, upstream = _inputs(3, 37, 24, 301, torch.float32)
    kernels = torch_kernels(*chunks)
    if not one_pass:
        kernels = dataclasses.replace(kernels, lse_target_and_mean=None)
    x = h.clone().requires_grad_()
    logp = head_logprobs_with(kernels, x, w, targets, temperature)
    logp.backward(upstream)
    ref_logp, ref_grad = _reference(h, w, targets, upstream, temperature)
    assert _rel(logp.detach(), ref_logp) < 1e-6
    assert _rel(x.grad, ref_grad) < 1e-5
    assert (x.grad[upstream == 0] == 0).all()


def test_off_target_mass_and_mean_are_what_they_say():
    h, w, targets, _ = _inputs(5, 20, 16, 90, torch.float32)
    saved = chunked_lse_target_and_mean(h, w, targets, 0.8, chunk_tokens=7, chunk_vocab=13)
    p = torch.softmax(h.double() @ w.double().T / 0.8, dim=-1)
    off = p.clone()
    off[torch.arange(20), targets] = 0
    torch.testing.assert_close(saved.off_mass.double(), off.sum(-1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(saved.mean.double(), off @ w.double(), rtol=1e-5, atol=1e-6)
    lse, target = chunked_lse_and_target(h, w, targets, 0.8, chunk_tokens=7, chunk_vocab=13)
    torch.testing.assert_close(saved.lse, lse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(saved.target, target)


def test_confident_tokens_keep_their_gradient():
    """p(target) ~ 1 - 1e-6: dH is tiny and must come from the off-target terms, not a cancellation."""
    h, w, _, upstream = _inputs(7, 16, 32, 64, torch.float32, logit_scale=1.0)
    targets = torch.randperm(64, generator=torch.Generator().manual_seed(8))[:16]  # one token per target row
    w[targets] += 6.0 * h / h.norm(dim=1, keepdim=True)  # each token's target row points along it
    x = h.clone().requires_grad_()
    head_logprobs_with(torch_kernels(8, 16), x, w, targets).backward(upstream)
    _, ref_grad = _reference(h, w, targets, upstream, 1.0)
    p = torch.softmax(h.double() @ w.double().T, dim=-1)[torch.arange(16), targets]
    assert p.min() > 0.99
    assert _rel(x.grad, ref_grad) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_matmuls_as_on_cuda(monkeypatch, dtype):
    """The CUDA path for 16-bit inputs (matmuls in the input dtype), forced on CPU: within 1e-2."""
    monkeypatch.setattr(head_module, "matmul_dtype", lambda hidden: hidden.dtype)
    h, w, targets, upstream = _inputs(9, 48, 64, 500, dtype)
    x = h.clone().requires_grad_()
    logp = head_logprobs_with(torch_kernels(16, 128), x, w, targets, 0.9)
    logp.backward(upstream)
    ref_logp, ref_grad = _reference(h, w, targets, upstream, 0.9)
    assert x.grad.dtype == dtype
    assert _rel(logp.detach(), ref_logp) < 1e-2
    assert _rel(x.grad, ref_grad) < 1e-2


def test_backward_runs_no_matmul(monkeypatch):
    """Forward: one pass of matmuls over the tiles; backward: elementwise only."""
    h, w, targets, upstream = _inputs(1, 30, 16, 200, torch.float32)
    x = h.clone().requires_grad_()
    logp = head_logprobs_with(torch_kernels(8, 64), x, w, targets)
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(1) or real_mm(*a, **k))
    logp.backward(upstream)
    assert calls == [] and torch.isfinite(x.grad).all()


def test_no_grad_pass_keeps_only_the_logsumexp():
    """Without grad (old-policy and reference passes) the forward skips the mean: one matmul per tile."""
    h, w, targets, _ = _inputs(2, 30, 16, 200, torch.float32)
    calls = []
    kernels = torch_kernels(8, 64)
    counting = type(kernels)(kernels.lse_and_target, kernels.grad_hidden, kernels.skip_zero_grad,
                             lambda *a: calls.append(1) or kernels.lse_target_and_mean(*a))
    with torch.no_grad():
        logp = head_logprobs_with(counting, h, w, targets)
    assert calls == []
    torch.testing.assert_close(logp.double(), reference_logprobs(h.double(), w.double(), targets), rtol=1e-6,
                               atol=1e-6)


def test_nan_row_stays_in_its_row():
    h, w, targets, upstream = _inputs(4, 12, 16, 50, torch.float32)
    h[5, 3] = float("nan")
    x = h.clone().requires_grad_()
    logp = head_logprobs_with(torch_kernels(4, 16), x, w, targets)
    logp.backward(torch.ones(12))
    others = torch.arange(12) != 5
    assert torch.isnan(logp[5]) and torch.isfinite(logp[others]).all()
    assert torch.isnan(x.grad[5]).all() and torch.isfinite(x.grad[others]).all()


def test_tiles_are_larger_on_cuda():
    from sparselayer.kernels.head_logprobs import (
        CUDA_CHUNK_TOKENS,
        CUDA_CHUNK_VOCAB,
        DEFAULT_CHUNK_TOKENS,
        DEFAULT_CHUNK_VOCAB,
        head_kernels,
    )

    def tile(device: str) -> tuple[int, int]:
        keywords = head_kernels("torch", torch.device(device)).lse_target_and_mean.keywords
        return keywords["chunk_tokens"], keywords["chunk_vocab"]

    assert tile("cpu") == (DEFAULT_CHUNK_TOKENS, DEFAULT_CHUNK_VOCAB)
    assert tile("cuda") == (CUDA_CHUNK_TOKENS, CUDA_CHUNK_VOCAB)
    assert CUDA_CHUNK_TOKENS * CUDA_CHUNK_VOCAB * 4 <= 2**27  # one float32 tile at most 128 MiB
