"""Fused LM-head GRPO loss (chunked PyTorch and Triton) against a float64 materialized-logits reference."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

# The Triton kernels are built when sparselayer.kernels.grpo_loss_triton is first imported, and they run
# on CPU tensors only under the interpreter, so it is switched on before that import (CPU hosts only).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sparselayer.kernels.grpo_loss import (  # noqa: E402
    ENV_BACKEND, fused_grpo_loss, fused_logprobs, grpo_loss, logprobs, resolve_backend, triton_available)
from sparselayer.kernels.grpo_loss_reference import (  # noqa: E402
    per_token_grpo_loss, reference_grpo_loss, reference_logprobs)
from sparselayer.rl.grpo import per_token_loss, token_weights  # noqa: E402

HAS_TRITON = triton_available()
TRITON_RUNS = HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="triton not installed (or no CUDA and no interpreter)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Case:
    """Flat per-token inputs built from a padded B x T batch, as the trainer would produce them."""

    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    old_logp: torch.Tensor
    advantages: torch.Tensor
    token_weights: torch.Tensor
    ref_logp: torch.Tensor | None
    tis_weights: torch.Tensor | None
    temperature: float
    beta: float
    pad: torch.Tensor  # bool (N,), True on padding tokens


def make_case(seed: int, loss_type: str, dtype: torch.dtype, temperature: float = 1.0, beta: float = 0.0,
              tis: bool = False, batch: int = 3, length: int = 13, hidden: int = 32, vocab: int = 300,
              logit_scale: float = 2.0, on_policy: bool = False) -> Case:
    """Random inputs: padded sequences, weights from token_weights(loss_type), ratios on both sides of the clip."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[0] = length - 4  # at least one padded sequence
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    weights = token_weights(mask, loss_type, length, micro_batches=[[0, 1], list(range(2, batch))]).reshape(-1)
    n = batch * length
    h = torch.randn(n, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * logit_scale / math.sqrt(hidden)).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    logp = reference_logprobs(h.double(), w.double(), targets, temperature).float()
    noise = 0.0 if on_policy else 0.3
    old = logp + noise * torch.randn(n, generator=g)
    adv = torch.randn(batch, generator=g).repeat_interleave(length)
    ref = logp + 0.2 * torch.randn(n, generator=g) if beta > 0 else None
    tis_w = torch.rand(n, generator=g) * 1.5 if tis else None
    return Case(h, w, targets, old, adv, weights, ref, tis_w, temperature, beta, ~mask.reshape(-1))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Norm-wise relative error of got against the float64 truth."""
    return ((got.double() - want).norm() / want.norm().clamp(min=1e-30)).item()


def to_device(t: torch.Tensor | None) -> torch.Tensor | None:
    """Move an optional tensor to the test device."""
    return None if t is None else t.to(DEVICE)


def run_loss(fn: LossFn, case: Case,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logp, dH, weight) from `fn` on leaf inputs of `dtype`; the weight requires grad to catch a dW."""
    h = case.hidden.to(DEVICE, dtype, copy=True).requires_grad_()
    w = case.weight.to(DEVICE, dtype, copy=True).requires_grad_()
    loss, logp = fn(h, w, case.targets.to(DEVICE), case.old_logp.to(DEVICE), case.advantages.to(DEVICE),
                    case.token_weights.to(DEVICE), 0.2, 0.28, case.beta, to_device(case.ref_logp),
                    to_device(case.tis_weights), case.temperature)
    loss.backward()
    return loss.detach().cpu(), logp.detach().cpu(), h.grad.cpu(), w


def reference(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(loss, logp, dH, loss scale) in float64 from the same (rounded) inputs.

    The loss is a signed sum that can nearly cancel, so its error is measured against the scale
    sum_t |w_t * l_t| of its terms (the condition of the sum), not against the sum itself.
    """
    h = case.hidden.double().requires_grad_()
    opt = lambda t: None if t is None else t.double()  # noqa: E731
    loss, logp = reference_grpo_loss(h, case.weight.double(), case.targets, case.old_logp.double(),
                                     case.advantages.double(), case.token_weights.double(), 0.2, 0.28, case.beta,
                                     opt(case.ref_logp), opt(case.tis_weights), case.temperature)
    loss.backward()
    terms = per_token_grpo_loss(logp.detach(), case.old_logp.double(), case.advantages.double(), 0.2, 0.28,
                                case.beta, opt(case.ref_logp), opt(case.tis_weights))
    return loss.detach(), logp.detach(), h.grad, (case.token_weights.double() * terms).abs().sum().item()


def check_against_reference(fn: LossFn, case: Case, dtype: torch.dtype, tol: float | None = None) -> None:
    """logp, loss and dH within the dtype's tolerance, all finite, padding rows zero, no weight gradient."""
    loss, logp, dh, w = run_loss(fn, case, dtype)
    ref_loss, ref_logp, ref_dh, loss_scale = reference(case)
    for got in (loss, logp, dh):
        assert torch.isfinite(got).all()
    assert w.grad is None
    assert dh.dtype == dtype and logp.dtype == torch.float32
    tol = TOLERANCE[dtype] if tol is None else tol
    assert rel_err(logp, ref_logp) < TOLERANCE[dtype]
    assert abs(loss.double().item() - ref_loss.item()) / loss_scale < tol
    assert rel_err(dh, ref_dh) < tol
    assert (dh[case.pad] == 0).all()


# (loss type, dtype, temperature, beta, tis): every loss type in both dtypes; temperature, KL and TIS spread over them.
CASES = [
    ("grpo", torch.float32, 1.0, 0.0, False),
    ("dr_grpo", torch.float32, 0.7, 0.04, False),
    ("dapo", torch.float32, 1.3, 0.0, True),
    ("bnpo", torch.float32, 0.7, 0.1, True),
    ("grpo", torch.bfloat16, 0.7, 0.04, True),
    ("dr_grpo", torch.bfloat16, 1.0, 0.0, False),
    ("dapo", torch.bfloat16, 1.0, 0.1, False),
    ("bnpo", torch.bfloat16, 1.3, 0.0, True),
]


def test_cases_cover_every_loss_type_in_both_dtypes():
    for dtype in TOLERANCE:
        assert sorted(c[0] for c in CASES if c[1] == dtype) == sorted(LOSS_TYPES)


def torch_loss(chunk_tokens: int = 16, chunk_vocab: int = 64) -> LossFn:
    """The chunked PyTorch path with tiles that do not divide N = 39 or V = 300."""
    return lambda *args: fused_grpo_loss(*args, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)


@pytest.mark.parametrize("loss_type,dtype,temperature,beta,tis", CASES)
def test_torch_matches_reference(loss_type, dtype, temperature, beta, tis):
    case = make_case(1, loss_type, dtype, temperature, beta, tis)
    check_against_reference(torch_loss(), case, dtype)


@pytest.mark.parametrize("chunks", [(1, 7), (39, 300), (1000, 1000)])
def test_torch_any_tiling(chunks):
    case = make_case(2, "dapo", torch.float32, 0.9, 0.05, True)
    check_against_reference(torch_loss(*chunks), case, torch.float32)


# Logits up to ~700 (exp overflows fp32 past 88: the online logsumexp must not) with old == current
# (ratio 1: ties inside min). fp32 logits of that size carry absolute errors ~ eps * |z| ~ 1e-4, which
# exp(logp - old) passes on to loss and dH: the fp32 bound there is 1e-3, log-probs stay within 1e-5.
LARGE_LOGITS_TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_large_logits_and_on_policy(dtype):
    case = make_case(3, "grpo", dtype, 0.5, 0.1, False, logit_scale=80.0, on_policy=True)
    check_against_reference(torch_loss(), case, dtype, LARGE_LOGITS_TOL[dtype])


def test_reference_agrees_with_trainer_loss():
    """The flat reference equals (token_weights * rl.grpo.per_token_loss).sum() on the B x T batch."""
    case = make_case(4, "grpo", torch.float64, 1.0, 0.1, False)
    loss, logp = reference_grpo_loss(case.hidden, case.weight, case.targets, case.old_logp.double(),
                                     case.advantages.double(), case.token_weights.double(), 0.2, 0.28, 0.1,
                                     case.ref_logp.double())
    b, t = 3, 13
    per_sequence_adv = case.advantages.view(b, t)[:, 0].double()
    trainer = per_token_loss(logp.view(b, t), case.old_logp.double().view(b, t), per_sequence_adv, 0.2, 0.28, 0.1,
                             case.ref_logp.double().view(b, t))
    torch.testing.assert_close(loss, (case.token_weights.double().view(b, t) * trainer.loss).sum())


def test_fused_logprobs_and_dispatch(monkeypatch):
    case = make_case(5, "dapo", torch.float32, 0.8)
    want = reference_logprobs(case.hidden.double(), case.weight.double(), case.targets, 0.8)
    got = fused_logprobs(case.hidden, case.weight, case.targets, 0.8, chunk_tokens=8, chunk_vocab=33)
    assert rel_err(got, want) < 1e-5 and not got.requires_grad
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    assert rel_err(logprobs(case.hidden, case.weight, case.targets, 0.8, backend="torch"), want) < 1e-5
    loss, _ = grpo_loss(case.hidden, case.weight, case.targets, case.old_logp, case.advantages, case.token_weights,
                        0.2, 0.28, 0.0, temperature=0.8, backend="torch")
    assert abs(loss.item() - reference(case)[0].item()) / reference(case)[3] < 1e-5


def test_backend_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("auto", cuda) == ("triton" if HAS_TRITON else "torch")
    monkeypatch.setenv(ENV_BACKEND, "triton")
    assert resolve_backend("auto", cpu) == "triton"
    assert resolve_backend("torch", cpu) == "torch"  # an explicit argument wins
    monkeypatch.setenv(ENV_BACKEND, "torch")
    assert resolve_backend("auto", cuda) == "torch"
    monkeypatch.setenv(ENV_BACKEND, "cuda")
    with pytest.raises(ValueError):
        resolve_backend("auto", cpu)
    with pytest.raises(ValueError):
        resolve_backend("numba", cpu)


def test_input_errors():
    case = make_case(6, "dapo", torch.float32)
    args = (case.hidden, case.weight, case.targets, case.old_logp, case.advantages, case.token_weights, 0.2, 0.2)
    with pytest.raises(ValueError, match="reference log-probs"):
        fused_grpo_loss(*args, 0.1)
    with pytest.raises(ValueError, match="weight"):
        fused_grpo_loss(case.hidden, case.weight[:, :5], *args[2:], 0.0)


def test_torch_never_allocates_tokens_by_vocab():
    """Peak of the torch CPU allocator during forward + backward stays far below one N x V fp32 tensor."""
    from torch.profiler import ProfilerActivity, profile

    n, hdim, vocab = 256, 32, 4096
    h = torch.randn(n, hdim, requires_grad=True)
    w = torch.randn(vocab, hdim) / math.sqrt(hdim)
    targets = torch.randint(0, vocab, (n,))
    zeros, ones = torch.zeros(n), torch.ones(n) / n
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, _ = fused_grpo_loss(h, w, targets, zeros - 9.0, torch.randn(n), ones, 0.2, 0.2, 0.0,
                                  chunk_tokens=64, chunk_vocab=1024)
        loss.backward()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    assert 0 < peak < n * vocab * 4 / 4  # one 64 x 1024 tile is n * vocab * 4 / 16 bytes


# ----------------------------------------------------------------------------------------------- Triton


def triton_loss() -> LossFn:
    """The Triton path (imported here, after TRITON_INTERPRET is set)."""
    from sparselayer.kernels.grpo_loss_triton import triton_grpo_loss

    return triton_grpo_loss


@needs_triton
@pytest.mark.parametrize("loss_type,dtype,temperature,beta,tis", CASES)
def test_triton_matches_reference(loss_type, dtype, temperature, beta, tis):
    # N = 39, V = 300, H = 40: none a multiple of the blocks (16 x 64 x 32 interpreted)
    case = make_case(7, loss_type, dtype, temperature, beta, tis, hidden=40)
    check_against_reference(triton_loss(), case, dtype)


@needs_triton
def test_triton_large_logits_on_policy_and_dispatch(monkeypatch):
    case = make_case(8, "grpo", torch.float32, 0.5, 0.1, False, logit_scale=80.0, on_policy=True)
    check_against_reference(triton_loss(), case, torch.float32, LARGE_LOGITS_TOL[torch.float32])
    monkeypatch.setenv(ENV_BACKEND, "triton")
    check_against_reference(grpo_loss, case, torch.float32, LARGE_LOGITS_TOL[torch.float32])
    want = reference_logprobs(case.hidden.double(), case.weight.double(), case.targets, 0.5)
    got = logprobs(case.hidden.to(DEVICE), case.weight.to(DEVICE), case.targets.to(DEVICE), 0.5)
    assert rel_err(got.cpu(), want) < 1e-5
