"""Fused RMSNorm / SwiGLU / frozen MLP (chunked PyTorch and Triton) against float64 references, and the
patched model against the unpatched one (Qwen3, Qwen2, Llama)."""
from __future__ import annotations

import os

import pytest
import torch

# The Triton kernels are built when sparselayer.kernels.norm_mlp_triton is first imported and run on CPU
# tensors only under the interpreter, so it is switched on before that import (CPU hosts only).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import make_tiny_model  # noqa: E402
from helpers import DigitShareTask  # noqa: E402

from sparselayer.config import TrainConfig  # noqa: E402
from sparselayer.errors import ConfigError  # noqa: E402
from sparselayer.kernels import norm_mlp  # noqa: E402
from sparselayer.kernels.backend import ENV_BACKEND, triton_available  # noqa: E402
from sparselayer.kernels.norm_mlp import frozen_mlp, rms_norm, swiglu  # noqa: E402
from sparselayer.kernels.norm_mlp_reference import reference_mlp, reference_rms_norm, reference_swiglu  # noqa: E402
from sparselayer.kernels.patch import patched_modules, resolve_kernels, restore_forward, use_fused_kernels  # noqa: E402
from sparselayer.trainer import Trainer  # noqa: E402

TRITON_RUNS = triton_available() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not TRITON_RUNS, reason="no triton runtime"))]
DTYPES = [torch.float32, torch.bfloat16]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Norm-wise relative error of got against the float64 truth; got must be finite."""
    assert torch.isfinite(got).all()
    return ((got.detach().double().cpu() - want).norm() / want.norm().clamp(min=1e-30)).item()


def leaf(t: torch.Tensor, dtype: torch.dtype, grad: bool = True) -> torch.Tensor:
    """A fresh leaf copy on the test device."""
    return t.to(DEVICE, dtype, copy=True).requires_grad_(grad)


def as64(t: torch.Tensor, grad: bool = True) -> torch.Tensor:
    """The float64 CPU twin of a (rounded) tensor, for the reference."""
    return t.detach().cpu().double().requires_grad_(grad)


# --------------------------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trained", [True, False])
def test_rms_norm_matches_reference(backend, dtype, trained):
    g = torch.Generator().manual_seed(1)
    shape = (3, 13, 45)  # 39 rows, H = 45: no block or chunk size divides them
    x = leaf(torch.randn(shape, generator=g) * 3, dtype)
    w = leaf(1 + 0.3 * torch.randn(shape[-1], generator=g), dtype, trained)
    dy = torch.randn(shape, generator=g)
    y = rms_norm(x, w, 1e-6, backend)
    y.backward(dy.to(DEVICE, dtype))
    x64, w64 = as64(x), as64(w, trained)
    y64 = reference_rms_norm(x64, w64, 1e-6)
    y64.backward(dy.double())
    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and y.shape == shape
    assert rel_err(y, y64.detach()) < tol
    assert rel_err(x.grad, x64.grad) < tol
    if trained:
        assert rel_err(w.grad, w64.grad) < tol
    else:
        assert w.grad is None


@pytest.mark.parametrize("elements", [1, 45 * 7, 10**9])
def test_torch_rms_norm_any_chunking(monkeypatch, elements):
    monkeypatch.setattr(norm_mlp, "CHUNK_ELEMENTS", elements)
    monkeypatch.setattr(norm_mlp, "CUDA_CHUNK_ELEMENTS", elements)
    g = torch.Generator().manual_seed(2)
    x, w = leaf(torch.randn(39, 45, generator=g), torch.float32), leaf(torch.randn(45, generator=g), torch.float32)
    rms_norm(x, w, 1e-5, "torch").sum().backward()
    x64, w64 = as64(x), as64(w)
    reference_rms_norm(x64, w64, 1e-5).sum().backward()
    assert rel_err(x.grad, x64.grad) < 1e-5 and rel_err(w.grad, w64.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_nan_propagates(backend):
    x = leaf(torch.randn(5, 24), torch.float32)
    with torch.no_grad():
        x[2, 3] = float("nan")
    w = leaf(torch.ones(24), torch.float32)
    y = rms_norm(x, w, 1e-6, backend)
    y.sum().backward()
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3, 4]]).all()
    assert torch.isnan(x.grad[2]).all() and torch.isfinite(x.grad[[0, 1, 3, 4]]).all()
    assert torch.isnan(w.grad).any()


# ---------------------------------------------------------------------------------------------- SwiGLU


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_reference(backend, dtype):
    g = torch.Generator().manual_seed(3)
    shape = (3, 13, 70)
    gate, up = leaf(torch.randn(shape, generator=g) * 3, dtype), leaf(torch.randn(shape, generator=g), dtype)
    grad = torch.randn(shape, generator=g)
    out = swiglu(gate, up, backend)
    out.backward(grad.to(DEVICE, dtype))
    gate64, up64 = as64(gate), as64(up)
    out64 = reference_swiglu(gate64, up64)
    out64.backward(grad.double())
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype
    assert rel_err(out, out64.detach()) < tol
    assert rel_err(gate.grad, gate64.grad) < tol and rel_err(up.grad, up64.grad) < tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_nan_propagates(backend):
    gate, up = leaf(torch.randn(4, 10), torch.float32), leaf(torch.randn(4, 10), torch.float32)
    with torch.no_grad():
        gate[1, 2] = float("nan")
    out = swiglu(gate, up, backend)
    out.sum().backward()
    assert torch.isnan(out[1, 2]) and torch.isnan(gate.grad[1, 2]) and torch.isnan(up.grad[1, 2])
    assert torch.isfinite(out).sum() == 39


# ------------------------------------------------------------------------------------------ frozen MLP


def mlp_weights(seed: int, hidden: int = 45, inter: int = 70, bias: bool = False) -> list[torch.Tensor | None]:
    """Random frozen gate, up, down weights (and biases) of a SwiGLU MLP."""
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(inter, hidden, generator=g) / hidden**0.5 for _ in range(2))
    weights = [gate, up, torch.randn(hidden, inter, generator=g) / inter**0.5]
    biases = [0.1 * torch.randn(n, generator=g) for n in (inter, inter, hidden)] if bias else [None] * 3
    return weights + biases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_frozen_mlp_matches_reference(monkeypatch, backend, dtype, bias):
    monkeypatch.setattr(norm_mlp, "CHUNK_ELEMENTS", 70 * 9)  # 9-row chunks over 39 rows
    monkeypatch.setattr(norm_mlp, "CUDA_CHUNK_ELEMENTS", 70 * 9)
    g = torch.Generator().manual_seed(4)
    x = leaf(torch.randn(3, 13, 45, generator=g), dtype)
    params = [None if t is None else t.to(DEVICE, dtype) for t in mlp_weights(5, bias=bias)]
    grad = torch.randn(3, 13, 45, generator=g)
    out = frozen_mlp(x, *params, backend=backend)
    out.backward(grad.to(DEVICE, dtype))
    x64 = as64(x)
    out64 = reference_mlp(x64, *[None if t is None else t.cpu().double() for t in params])
    out64.backward(grad.double())
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, out64.detach()) < tol and rel_err(x.grad, x64.grad) < tol


def test_frozen_mlp_refuses_trainable_weights():
    params = mlp_weights(6)
    params[0].requires_grad_()
    with pytest.raises(ValueError, match="must not require grad"):
        frozen_mlp(torch.randn(2, 45, requires_grad=True), *params)


def test_frozen_mlp_nan_propagates():
    x = leaf(torch.randn(6, 45), torch.float32)
    with torch.no_grad():
        x[4, 0] = float("nan")
    out = frozen_mlp(x, *mlp_weights(7), backend="torch")
    out.sum().backward()
    assert torch.isnan(out[4]).all() and torch.isnan(x.grad[4]).all()
    assert torch.isfinite(out[:4]).all() and torch.isfinite(x.grad[:4]).all()


def saved_bytes(fn, *weights: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves while fn runs, the given (frozen) weights excluded."""
    skip = {w.untyped_storage().data_ptr() for w in weights}
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in skip:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_saved_memory_of_fused_paths():
    """What autograd keeps: frozen Linear keeps no input; the fused paths keep less than HF's ops."""
    x = torch.randn(64, 32, requires_grad=True)
    wg, wu, wd = mlp_weights(8, hidden=32, inter=96)[:3]
    row = 64 * 4  # bytes of one float32 value per row
    assert saved_bytes(lambda: torch.nn.functional.linear(x * 1, wg), wg) == 0
    assert saved_bytes(lambda: reference_mlp(x * 1, wg, wu, wd), wg, wu, wd) == 3 * 96 * row  # gate, silu, up
    assert saved_bytes(lambda: frozen_mlp(x * 1, wg, wu, wd), wg, wu, wd) == 32 * row  # its input only
    h = x * 1
    assert saved_bytes(lambda: swiglu(h @ wg.T, h @ wu.T), wg, wu) == 2 * 96 * row  # gate and up
    w = torch.ones(32)
    assert saved_bytes(lambda: rms_norm(x * 1, w, 1e-6), w) == 33 * row  # x and rstd
    assert saved_bytes(lambda: reference_rms_norm(x * 1, w, 1e-6), w) == 33 * row  # HF's ops, float32: the same


# ------------------------------------------------------------------------------------ patched models


def _trainer(model, **extra) -> Trainer:
    cfg = TrainConfig.from_mapping({"model": str(model), "layers": "1", "prompts_per_step": 4, "num_generations": 4,
                                    "micro_batch_size": 6, "dtype": "float32", "max_completion_length": 6,
                                    "seed": 3, "fused_layers": True, **extra})
    return Trainer(cfg, task=DigitShareTask())


def _pass(trainer: Trainer) -> tuple[dict, torch.Tensor, dict]:
    """(loss stats, log-probs of the first pass, trained gradients) of one accumulation on a fresh batch."""
    sb = trainer.rollout_batch()
    trainer.attach_prefix(sb)
    stats = trainer.accumulate_gradients(sb)
    return stats, sb.old_logp.clone(), {n: p.grad.clone() for n, p in trainer.trained.items()}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict:
    """Tiny random Qwen3, Qwen2 and Llama models (4 layers, hidden 32)."""
    root = tmp_path_factory.mktemp("families")
    return {kind: make_tiny_model(root / kind, model_type=kind, seed=2) for kind in ("qwen3", "qwen2", "llama")}


@pytest.mark.parametrize("kind,backend", [("qwen3", "torch"), ("qwen2", "torch"), ("llama", "torch"),
                                          pytest.param("qwen3", "triton", marks=pytest.mark.skipif(
                                              not TRITON_RUNS, reason="no triton runtime"))])
def test_patched_model_gives_same_logprobs_loss_and_gradients(family_models, kind, backend):
    plain = _pass(_trainer(family_models[kind], fused_layers=False, kernels=backend))
    trainer = _trainer(family_models[kind], kernels=backend)
    assert patched_modules(trainer.model)
    fused = _pass(trainer)
    assert fused[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-5)
    assert rel_err(fused[1], plain[1].double()) <= 1e-5
    for name, grad in plain[2].items():
        assert grad.norm() > 0
        assert rel_err(fused[2][name], grad.double()) <= 1e-5, name


def test_patch_scope_generation_and_restore(family_models):
    """Prefix untouched; q/k norms patched; same state dict; generation unchanged; restore undoes it."""
    trainer = _trainer(family_models["qwen3"], fused_layers=False, layers="2")
    model = trainer.model
    keys = list(model.state_dict())
    ids = torch.tensor([[5, 6, 7, 8]], device=model.device)
    before = model.generate(ids, max_new_tokens=6, do_sample=False)
    count = use_fused_kernels(model, [2], "torch")
    names = patched_modules(model)
    assert count == len(names) == 2 * 5 + 1  # layers 2, 3: two norms, q_norm, k_norm, mlp; final norm
    assert all(n.startswith(("model.layers.2.", "model.layers.3.", "model.norm")) for n in names)
    assert "model.layers.3.self_attn.q_norm" in names and "model.layers.2.mlp" in names
    assert list(model.state_dict()) == keys
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), before)
    assert restore_forward(model) == count and not patched_modules(model)


def test_patch_with_checkpointing_and_all_layers(family_models):
    """--gradient-checkpointing and --layers all (every layer trained) give the plain gradients too."""
    for extra in ({"gradient_checkpointing": True}, {"layers": "all", "prefix_cache": False}):
        plain = _pass(_trainer(family_models["llama"], fused_layers=False, **extra))
        fused = _pass(_trainer(family_models["llama"], **extra))
        assert fused[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-5)
        for name, grad in plain[2].items():
            assert rel_err(fused[2][name], grad.double()) <= 1e-5, name


# ------------------------------------------------------------------------------------ backend setting


def test_kernels_setting(family_models, monkeypatch):
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    cpu = torch.device("cpu")
    assert resolve_kernels("auto", cpu) == "torch"
    monkeypatch.setenv(ENV_BACKEND, "triton")  # the environment overrides "auto" only
    assert resolve_kernels("torch", cpu) == "torch"
    monkeypatch.setenv(ENV_BACKEND, "torch")
    trainer = _trainer(family_models["qwen2"], kernels="auto")
    assert trainer.kernels == "torch"
    assert {trainer.model.get_submodule(n)._sparselayer_kernels for n in patched_modules(trainer.model)} \
        == {"torch"}
    with pytest.raises(ConfigError, match="--kernels"):
        TrainConfig.from_mapping({"kernels": "cuda"}).validate()
    with pytest.raises(ConfigError, match="--kernels"):
        resolve_kernels("numba", cpu)
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ConfigError, match="CUDA"):
            resolve_kernels("triton", cpu)


@pytest.mark.parametrize("value", ["cuda", "TRITON"])
def test_cli_refuses_bad_kernels(capsys, tmp_path, monkeypatch, value):
    from sparselayer.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--kernels", value, "--max-steps", "1", "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("sparselayer: error:") and "--kernels" in err[0]


def test_fused_layers_unset_means_cuda_only_and_the_flags_still_set_it(family_models):
    """--fused-layers / --no-fused-layers set it; unset, the kernels are used with CUDA only (on CPU they cost
    time and saved no memory in bench_vs_trl), so a CPU trainer keeps the stock modules."""
    from sparselayer.cli import build_parser, resolve_train_config
    from sparselayer.kernels.patch import patched_modules

    def parsed(*flags: str) -> bool | None:
        return resolve_train_config(build_parser().parse_args(["train", *flags])).model.fused_layers

    assert (parsed(), parsed("--fused-layers"), parsed("--no-fused-layers")) == (None, True, False)
    assert TrainConfig.from_mapping({"fused_layers": "false"}).model.fused_layers is False
    assert patched_modules(_trainer(family_models["qwen3"], fused_layers=None, device="cpu").model) == []
    assert patched_modules(_trainer(family_models["qwen3"]).model)  # fused_layers True in _trainer
