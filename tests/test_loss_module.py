"""`FusedLMHeadGRPOLoss` (the drop-in module) against the plain loss in float64: materialised logits, plain
autograd, the same objective; loss and dL/dhidden within 1e-5 relative in float32 (fresh random inputs)."""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from sparselayer import FusedLMHeadGRPOLoss
from sparselayer.objective import BatchTotals, ObjectiveOptions, objective_loss, sampling_correction, token_weights

B, T, H, V = 4, 6, 16, 37


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    logp_like = lambda: -torch.rand(B, T, generator=g) * 3  # noqa: E731
    sampling = logp_like()
    sampling[0, 1] = float("nan")  # the sampler had no log-prob for this token
    return {"hidden": torch.randn(B, T, H, generator=g), "weight": torch.randn(V, H, generator=g) / 4,
            "ids": torch.randint(0, V, (B, T), generator=g), "mask": mask, "adv": torch.randn(B, generator=g),
            "old": logp_like(), "ref": logp_like(), "sampling": sampling}


def _reference(b: dict, module: FusedLMHeadGRPOLoss, on_policy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and dL/dhidden in float64 with materialised B x T x V logits and plain autograd."""
    hidden = b["hidden"].double().requires_grad_()
    logits = hidden @ b["weight"].double().T / module.temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, b["ids"].unsqueeze(-1)).squeeze(-1)
    old = logp.detach() if on_policy else b["old"].double()
    is_weights = None if module.is_mode is None else sampling_correction(
        old, b["sampling"].double(), module.is_mode, *module.is_bounds, mask=b["mask"])
    terms = objective_loss(logp, old, b["adv"].double(), module.options, b["ref"].double(), is_weights, b["mask"])
    weights = token_weights(b["mask"].double(), module.options.loss_type, T, [list(range(B))])
    loss = (weights * terms.loss).sum()
    loss.backward()
    return loss.detach(), hidden.grad


def _fused(b: dict, module: FusedLMHeadGRPOLoss, on_policy: bool, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = b["hidden"].clone().requires_grad_()
    loss, logp = module(hidden, b["weight"], b["ids"], b["mask"], b["adv"], None if on_policy else b["old"],
                        b["ref"], b["sampling"], **kwargs)
    loss.backward()
    assert torch.isfinite(logp).all() and (logp[b["mask"] == 0] == 0).all()
    return loss.detach(), hidden.grad


CASES = list(itertools.product(["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo"], ["token", "sequence"],
                               [None, "token_truncate", "sequence_mask"], [0.0, 0.05]))


@pytest.mark.parametrize(("loss_type", "level", "mode", "beta"), CASES)
def test_module_matches_the_float64_plain_loss(loss_type, level, mode, beta):
    module = FusedLMHeadGRPOLoss(loss_type, epsilon=0.2, epsilon_high=0.28 if loss_type != "cispo" else 5.0,
                                 beta=beta, temperature=0.9, importance_sampling_level=level,
                                 vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=0.5,
                                 vllm_importance_sampling_clip_max=2.0, backend="torch")
    b = _batch(seed=zlib.crc32(repr((loss_type, level, mode, beta)).encode()) % 10_000)  # stable per case
    for on_policy in (True, False):
        loss, grad = _fused(b, module, on_policy)
        ref_loss, ref_grad = _reference(b, module, on_policy)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        scale = ref_grad.abs().max().item()
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5 * scale)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # the GPU check runs this file on CUDA


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_each_backend_matches_on_each_device(backend, device):
    if backend == "triton" and device == "cpu" and torch.cuda.is_available():
        pytest.skip("Triton runs CPU tensors only under its interpreter, which CUDA hosts leave off")
    module = FusedLMHeadGRPOLoss("grpo", beta=0.04, importance_sampling_level="sequence", backend=backend)
    b = {k: v.to(device) for k, v in _batch(seed=11).items()}
    loss, grad = _fused(b, module, on_policy=False)
    ref_loss, ref_grad = _reference(b, module, on_policy=False)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5 * ref_grad.abs().max().item())


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo"])
def test_micro_batches_with_the_batch_totals_accumulate_to_the_whole_batch(loss_type):
    module = FusedLMHeadGRPOLoss(loss_type, backend="torch", vllm_importance_sampling_mode=None)
    b = _batch(seed=5)
    whole, whole_grad = _fused(b, module, on_policy=False)
    totals = BatchTotals(sequences=B, tokens=float(b["mask"].sum()), micro_batches=1 if loss_type != "bnpo" else 2)
    hidden = b["hidden"].clone().requires_grad_()
    total = 0.0
    for rows in (slice(0, 2), slice(2, 4)):
        part = {k: v[rows] if k != "weight" else v for k, v in b.items()}
        loss, _ = module(hidden[rows], part["weight"], part["ids"], part["mask"], part["adv"], part["old"],
                         part["ref"], totals=totals)
        loss.backward()
        total += loss.item()
    if loss_type == "bnpo":  # bnpo is a per-micro-batch mean by definition: not the whole-batch token mean
        assert total != pytest.approx(whole.item())
        return
    assert total == pytest.approx(whole.item(), rel=1e-5)
    torch.testing.assert_close(hidden.grad, whole_grad, rtol=1e-5, atol=1e-7)


def test_a_head_that_requires_grad_is_refused_and_options_are_trl_named():
    b = _batch(seed=2)
    module = FusedLMHeadGRPOLoss()
    with pytest.raises(ValueError):
        module(b["hidden"].requires_grad_(), b["weight"].clone().requires_grad_(), b["ids"], b["mask"], b["adv"])
    assert module.options == ObjectiveOptions("dapo", 0.2, None, 0.0, True, "token", 1.0, 1.05)
    with pytest.raises(ValueError, match="loss type"):
        FusedLMHeadGRPOLoss("nope")
