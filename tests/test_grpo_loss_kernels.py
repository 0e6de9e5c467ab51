"""Fused LM-head log-probs and the GRPO loss on them (chunked PyTorch and Triton) against a float64
materialized-logits reference, for every loss type of `sparselayer.objective`."""
from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# The Triton kernels are built when sparselayer.kernels.head_logprobs_triton is first imported, and they run
# on CPU tensors only under the interpreter, so it is switched on before that import (CPU hosts only).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sparselayer.kernels import (  # noqa: E402
    fused_grpo_loss,
    fused_logprobs,
    grpo_loss,
    head_logprobs,
    logprobs,
    reference_grpo_loss,
    reference_logprobs,
    triton_grpo_loss,
    triton_logprobs,
)
from sparselayer.kernels.backend import ENV_BACKEND, resolve_backend, triton_available  # noqa: E402
from sparselayer.objective import (  # noqa: E402
    LOSS_TYPES,
    ObjectiveOptions,
    objective_loss,
    per_token_loss,
    sampling_correction,
    token_weights,
)

HAS_TRITON = triton_available()
TRITON_RUNS = HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="triton not installed (or no CUDA and no interpreter)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
EPSILON = 0.2
EPSILON_HIGH = {"cispo": 1.2}  # CISPO caps the ratio itself (ratios here spread ~exp(+-0.3)); the others: 0.28
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
KERNELS_DIR = Path(__file__).resolve().parents[1] / "sparselayer" / "kernels"


@dataclass
class Case:
    """Flat per-token inputs built from a padded B x T batch, as the trainer would produce them."""

    loss_type: str
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

    @property
    def epsilon_high(self) -> float:
        return EPSILON_HIGH.get(self.loss_type, 0.28)


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
    return Case(loss_type, h, w, targets, old, adv, weights, ref, tis_w, temperature, beta, ~mask.reshape(-1))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Norm-wise relative error of got against the float64 truth."""
    return ((got.double().cpu() - want).norm() / want.norm().clamp(min=1e-30)).item()


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """got finite and within `tol` relative (norm-wise) of want: a NaN never passes."""
    assert torch.isfinite(got).all(), "non-finite values"
    err = rel_err(got, want)
    assert err < tol, f"relative error {err:.3g} >= {tol:g}"


def to_device(t: torch.Tensor | None) -> torch.Tensor | None:
    """Move an optional tensor to the test device."""
    return None if t is None else t.to(DEVICE)


def loss_args(case: Case, hidden: torch.Tensor, weight: torch.Tensor) -> tuple:
    """The positional arguments of every grpo_loss variant, on the test device."""
    return (hidden, weight, case.targets.to(DEVICE), to_device(case.old_logp), case.advantages.to(DEVICE),
            case.token_weights.to(DEVICE), EPSILON, case.epsilon_high, case.beta, to_device(case.ref_logp),
            to_device(case.tis_weights), case.temperature)


def run_loss(fn: LossFn, case: Case, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logp, dH) from `fn` on leaf inputs of `dtype`; a head weight that requires grad must be refused."""
    h = case.hidden.to(DEVICE, dtype, copy=True).requires_grad_()
    w = case.weight.to(DEVICE, dtype, copy=True)
    with pytest.raises(ValueError, match="weight"):  # the fused path never computes a dW: it must say so
        fn(*loss_args(case, h, w.clone().requires_grad_()), loss_type=case.loss_type)
    loss, logp = fn(*loss_args(case, h, w), loss_type=case.loss_type)
    loss.backward()
    return loss.detach().cpu(), logp.detach().cpu(), h.grad.cpu()


def reference(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(loss, logp, dH, loss scale) in float64 from the same (rounded) inputs.

    The loss is a signed sum that can nearly cancel, so its error is measured against the scale
    sum_t |w_t * l_t| of its terms (the condition of the sum), not against the sum itself.
    """
    h = case.hidden.double().requires_grad_()
    opt = lambda t: None if t is None else t.double()  # noqa: E731
    loss, logp = reference_grpo_loss(h, case.weight.double(), case.targets, case.old_logp.double(),
                                     case.advantages.double(), case.token_weights.double(), EPSILON,
                                     case.epsilon_high, case.beta, opt(case.ref_logp), opt(case.tis_weights),
                                     case.temperature, loss_type=case.loss_type)
    loss.backward()
    terms = per_token_loss(logp.detach(), case.old_logp.double(), case.advantages.double(), EPSILON,
                           case.epsilon_high, case.beta, opt(case.ref_logp), opt(case.tis_weights),
                           case.loss_type).loss
    return loss.detach(), logp.detach(), h.grad, (case.token_weights.double() * terms).abs().sum().item()


def check_against_reference(fn: LossFn, case: Case, dtype: torch.dtype, tol: float | None = None) -> None:
    """logp, loss and dH within the dtype's tolerance, all finite, padding rows zero, no weight gradient."""
    loss, logp, dh = run_loss(fn, case, dtype)
    ref_loss, ref_logp, ref_dh, loss_scale = reference(case)
    for got in (loss, logp, dh):
        assert torch.isfinite(got).all()
    assert dh.dtype == dtype and logp.dtype == torch.float32
    tol = TOLERANCE[dtype] if tol is None else tol
    assert_close(logp, ref_logp, TOLERANCE[dtype])
    assert abs(loss.double().item() - ref_loss.item()) / loss_scale < tol
    assert_close(dh, ref_dh, tol)
    assert (dh[case.pad] == 0).all()


# (loss type, dtype, temperature, beta, tis): every loss type in both dtypes; temperature, KL and TIS spread over them.
CASES = [
    ("grpo", torch.float32, 1.0, 0.0, False),
    ("dr_grpo", torch.float32, 0.7, 0.04, False),
    ("dapo", torch.float32, 1.3, 0.0, True),
    ("bnpo", torch.float32, 0.7, 0.1, True),
    ("cispo", torch.float32, 0.9, 0.04, True),
    ("sapo", torch.float32, 1.1, 0.04, True),
    ("grpo", torch.bfloat16, 0.7, 0.04, True),
    ("dr_grpo", torch.bfloat16, 1.0, 0.0, False),
    ("dapo", torch.bfloat16, 1.0, 0.1, False),
    ("bnpo", torch.bfloat16, 1.3, 0.0, True),
    ("cispo", torch.bfloat16, 1.0, 0.0, False),
    ("sapo", torch.bfloat16, 0.9, 0.1, False),
]


def test_cases_cover_every_loss_type_in_both_dtypes():
    assert "cispo" in LOSS_TYPES
    for dtype in TOLERANCE:
        assert sorted(c[0] for c in CASES if c[1] == dtype) == sorted(LOSS_TYPES)


def test_cispo_cap_binds_in_its_cases():
    """The CISPO cases exercise the cap: some ratios exceed epsilon_high, most do not."""
    case = make_case(1, "cispo", torch.float32)
    ratio = torch.exp(reference_logprobs(case.hidden.double(), case.weight.double(), case.targets) - case.old_logp)
    assert 0 < (ratio > case.epsilon_high).sum() < ratio.numel() / 2


def torch_loss(chunk_tokens: int = 16, chunk_vocab: int = 64) -> LossFn:
    """The chunked PyTorch path with tiles that do not divide N = 39 or V = 300."""
    return lambda *args, **kw: fused_grpo_loss(*args, **kw, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)


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


@pytest.mark.parametrize("loss_type", ["grpo", "cispo"])
def test_old_logp_none_is_on_policy(loss_type):
    """old_logp=None: the old log-probs are the policy's own, detached (ratio exactly 1)."""
    case = make_case(9, loss_type, torch.float32, 0.8, 0.05, True)
    case.old_logp = None
    h = case.hidden.clone().requires_grad_()
    loss, _ = fused_grpo_loss(*loss_args(case, h, case.weight), loss_type=loss_type, chunk_tokens=16, chunk_vocab=64)
    loss.backward()
    h64 = case.hidden.double().requires_grad_()
    args64 = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
              for t in loss_args(case, h64, case.weight.double())]
    ref_loss, _ = reference_grpo_loss(*args64, loss_type=loss_type)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * abs(ref_loss.item())
    assert_close(h.grad, h64.grad, 1e-5)


def test_reference_agrees_with_trainer_loss():
    """The flat reference equals (token_weights * objective.per_token_loss).sum() on the B x T batch."""
    case = make_case(4, "grpo", torch.float64, 1.0, 0.1, False)
    loss, logp = reference_grpo_loss(case.hidden, case.weight, case.targets, case.old_logp.double(),
                                     case.advantages.double(), case.token_weights.double(), 0.2, 0.28, 0.1,
                                     case.ref_logp.double())
    b, t = 3, 13
    per_sequence_adv = case.advantages.view(b, t)[:, 0].double()
    trainer = per_token_loss(logp.view(b, t), case.old_logp.double().view(b, t), per_sequence_adv, 0.2, 0.28, 0.1,
                             case.ref_logp.double().view(b, t))
    torch.testing.assert_close(loss, (case.token_weights.double().view(b, t) * trainer.loss).sum())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["grpo", "cispo", "sapo"])
def test_sequence_level_options_on_flat_inputs(backend, loss_type):
    """Sequence-level ratio (GSPO), bias-corrected KL and a sequence-level sampler correction on the flat entry
    points (seq_index, mask): fused against the float64 reference (float32, 1e-5), and the flat reference
    against the B x T objective, whose rows are the sequences."""
    b, t = 3, 13
    case = make_case(12, loss_type, torch.float32, 0.9, 0.05)
    options = ObjectiveOptions(loss_type, EPSILON, case.epsilon_high, 0.05, True, "sequence")
    seq_index, mask = torch.arange(b).repeat_interleave(t), ~case.pad
    sampler = case.old_logp + 0.2 * torch.randn(b * t, generator=torch.Generator().manual_seed(13))
    case.tis_weights = sampling_correction(case.old_logp, sampler, "sequence_truncate", None, 1.2, mask, seq_index)
    assert 0 < (case.tis_weights == 1.2).sum() < b * t  # the cap binds on some sequences, not all

    def run(fn: LossFn, h: torch.Tensor, w: torch.Tensor, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        args = [a.to(device, h.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in loss_args(case, h, w)]
        loss, logp = fn(*args, loss_type=loss_type, options=options, mask=mask.to(device),
                        seq_index=seq_index.to(device))
        loss.backward()
        return loss.detach().cpu(), logp.detach().cpu()

    h = case.hidden.to(DEVICE, copy=True).requires_grad_()
    loss, _ = run(torch_loss() if backend == "torch" else triton_grpo_loss, h, case.weight.to(DEVICE), DEVICE)
    h64 = case.hidden.double().requires_grad_()
    ref_loss, ref_logp = run(reference_grpo_loss, h64, case.weight.double(), "cpu")
    rows = objective_loss(ref_logp.view(b, t), case.old_logp.double().view(b, t),
                          case.advantages.double().view(b, t)[:, 0], options, case.ref_logp.double().view(b, t),
                          case.tis_weights.double().view(b, t), mask.view(b, t))
    terms = case.token_weights.double().view(b, t) * rows.loss
    torch.testing.assert_close(ref_loss, terms.sum())
    assert abs(loss.double().item() - ref_loss.item()) / terms.abs().sum().item() < 1e-5
    assert_close(h.grad.cpu(), h64.grad, 1e-5)
    assert (h.grad.cpu()[case.pad] == 0).all()


def test_fused_logprobs_and_dispatch(monkeypatch):
    case = make_case(5, "dapo", torch.float32, 0.8)
    want = reference_logprobs(case.hidden.double(), case.weight.double(), case.targets, 0.8)
    got = fused_logprobs(case.hidden, case.weight, case.targets, 0.8, chunk_tokens=8, chunk_vocab=33)
    assert rel_err(got, want) < 1e-5 and not got.requires_grad
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    assert rel_err(logprobs(case.hidden, case.weight, case.targets, 0.8, backend="torch"), want) < 1e-5
    loss, _ = grpo_loss(case.hidden, case.weight, case.targets, case.old_logp, case.advantages, case.token_weights,
                        0.2, 0.28, 0.0, temperature=0.8, backend="torch", loss_type="dapo")
    assert abs(loss.item() - reference(case)[0].item()) / reference(case)[3] < 1e-5
    # the no-grad passes accept a head weight that requires grad (nothing is differentiated there)
    trained_head = case.weight.clone().requires_grad_()
    assert rel_err(logprobs(case.hidden, trained_head, case.targets, 0.8, backend="torch"), want) < 1e-5


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
    with pytest.raises(ValueError, match="targets"):
        head_logprobs(case.hidden, case.weight, case.targets[:-1], backend="torch")
    with pytest.raises(ValueError, match="loss type"):
        fused_grpo_loss(*args, 0.0, loss_type="ppo")
    with pytest.raises(ValueError, match="must not require grad"):
        head_logprobs(case.hidden, case.weight.clone().requires_grad_(), case.targets, backend="torch")


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


# ---------------------------------------------------------------------------------- head_logprobs alone


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_logprobs_backward_matches_reference_autograd(backend, dtype):
    """For an arbitrary upstream gradient (zeros included: skipped tokens), dH equals autograd through
    the materialized-logits reference in float64."""
    case = make_case(10, "grpo", dtype, temperature=0.7, hidden=40)
    g = torch.Generator().manual_seed(11)
    upstream = torch.randn(case.targets.shape[0], generator=g) * (torch.rand(case.targets.shape[0], generator=g) > 0.3)
    h = case.hidden.to(DEVICE, copy=True).requires_grad_()
    logp = head_logprobs(h, case.weight.to(DEVICE), case.targets.to(DEVICE), 0.7, backend=backend)
    logp.backward(upstream.to(DEVICE))
    h64 = case.hidden.double().requires_grad_()
    ref = reference_logprobs(h64, case.weight.double(), case.targets, 0.7)
    ref.backward(upstream.double())
    assert logp.dtype == torch.float32 and h.grad.dtype == dtype
    assert_close(logp.detach(), ref.detach(), TOLERANCE[dtype])
    assert_close(h.grad, h64.grad, TOLERANCE[dtype])
    assert (h.grad[upstream == 0] == 0).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on the NaN row
@pytest.mark.parametrize("backend", BACKENDS)
def test_head_logprobs_nan_propagates(backend):
    """A NaN hidden row gives a NaN log-prob and gradient on that token only (it is never hidden)."""
    case = make_case(12, "grpo", torch.float32, hidden=40)
    h = case.hidden.to(DEVICE, copy=True)
    h[5, 3] = float("nan")
    h.requires_grad_()
    logp = head_logprobs(h, case.weight.to(DEVICE), case.targets.to(DEVICE), backend=backend)
    logp.sum().backward()
    others = torch.arange(h.shape[0], device=h.device) != 5
    assert torch.isnan(logp[5]) and torch.isfinite(logp[others]).all()
    assert torch.isnan(h.grad[5]).all() and torch.isfinite(h.grad[others]).all()


# ----------------------------------------------------------------------------------------- module layout


def kernel_imports() -> dict[str, set[str]]:
    """For each module of sparselayer/kernels, the sibling kernel modules it imports (relative, level 1)."""
    modules = {p.stem for p in KERNELS_DIR.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in modules:
        tree = ast.parse((KERNELS_DIR / f"{name}.py").read_text())
        graph[name] = {node.module.split(".")[0] for node in ast.walk(tree)
                       if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module} & modules
    return graph


def test_kernel_modules_form_no_cycle_and_triton_modules_stay_apart():
    graph = kernel_imports()
    for name, deps in graph.items():
        if name.endswith("_triton"):
            assert deps <= {"backend", "triton_common"}, name
        if name.startswith("norm_mlp"):
            assert not any(d.startswith(("head_logprobs", "grpo_loss")) for d in deps), name
        if name.startswith(("head_logprobs", "grpo_loss")):
            assert not any(d.startswith("norm_mlp") for d in deps), name
    seen: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle {' -> '.join(path + (name,))}"
        if name not in seen:
            seen.add(name)
            for dep in graph[name]:
                visit(dep, path + (name,))

    for name in graph:
        visit(name, ())


def test_package_import_does_not_import_triton():
    code = "import sys, sparselayer.kernels; assert 'triton' not in sys.modules, 'triton was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))


# ----------------------------------------------------------------------------------------------- Triton


@needs_triton
@pytest.mark.parametrize("loss_type,dtype,temperature,beta,tis", CASES)
def test_triton_matches_reference(loss_type, dtype, temperature, beta, tis):
    # N = 39, V = 300, H = 40: none a multiple of the blocks (16 x 64 x 32 interpreted)
    case = make_case(7, loss_type, dtype, temperature, beta, tis, hidden=40)
    check_against_reference(triton_grpo_loss, case, dtype)


@needs_triton
def test_triton_large_logits_on_policy_and_dispatch(monkeypatch):
    case = make_case(8, "grpo", torch.float32, 0.5, 0.1, False, logit_scale=80.0, on_policy=True)
    check_against_reference(triton_grpo_loss, case, torch.float32, LARGE_LOGITS_TOL[torch.float32])
    monkeypatch.setenv(ENV_BACKEND, "triton")
    check_against_reference(grpo_loss, case, torch.float32, LARGE_LOGITS_TOL[torch.float32])
    want = reference_logprobs(case.hidden.double(), case.weight.double(), case.targets, 0.5)
    got = logprobs(case.hidden.to(DEVICE), case.weight.to(DEVICE), case.targets.to(DEVICE), 0.5)
    assert rel_err(got.cpu(), want) < 1e-5
    got = triton_logprobs(case.hidden.to(DEVICE), case.weight.to(DEVICE), case.targets.to(DEVICE), 0.5)
    assert rel_err(got.cpu(), want) < 1e-5 and not got.requires_grad


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backward_ragged_vocab_groups(dtype):
    """The backward's work items: the last group of vocab blocks is ragged (one partial block), N is not a multiple
    of BLOCK_N and there are more items than programs (each program walks several); dH against float64 autograd."""
    from sparselayer.kernels import head_logprobs_triton as kernels

    b = kernels._blocks()
    vocab = b["block_v"] * (2 * b["vocab_blocks"] + 1) - 9  # 2 full groups, then one partial block
    case = make_case(14, "grpo", dtype, temperature=0.8, batch=4, length=b["block_n"] + 1, hidden=40, vocab=vocab)
    n = case.targets.shape[0]
    items = math.ceil(n / b["block_n"]) * 3  # token blocks x 3 vocab groups
    assert n % b["block_n"] and vocab % b["block_v"]
    assert not kernels.INTERPRETED or items > 2 * kernels.INTERPRETER_BACKWARD_PROGRAMS
    upstream = torch.randn(n, generator=torch.Generator().manual_seed(15))
    h = case.hidden.to(DEVICE, copy=True).requires_grad_()
    head_logprobs(h, case.weight.to(DEVICE), case.targets.to(DEVICE), 0.8, backend="triton").backward(
        upstream.to(DEVICE))
    h64 = case.hidden.double().requires_grad_()
    reference_logprobs(h64, case.weight.double(), case.targets, 0.8).backward(upstream.double())
    assert h.grad.dtype == dtype
    assert_close(h.grad, h64.grad, TOLERANCE[dtype])
