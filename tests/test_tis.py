"""--tis-cap: truncated importance-sampling weights, and their effect on the trained layer's gradient."""
from __future__ import annotations

import pytest
import torch
from helpers import DigitShareTask

from sparselayer.batch import Rollouts, collate
from sparselayer.config import TrainConfig
from sparselayer.model.layout import load_model
from sparselayer.model.logprobs import completion_logprobs
from sparselayer.objective import per_token_loss, tis_weights
from sparselayer.trainer import Trainer

LAYER = 2


def test_tis_weights_are_capped_ratios_detached_and_one_on_padding():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, 0.0]], requires_grad=True)
    sampling = torch.tensor([[-1.0, -1.0, -2.5], [-1.0, -1.5, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    w = tis_weights(old, sampling, cap=2.0, mask=mask)
    expected = torch.tensor([[1.0, torch.e ** -1, 2.0], [torch.e ** -2, torch.e ** 0.5, 1.0]])
    assert torch.allclose(w, expected) and not w.requires_grad
    assert tis_weights(old, sampling, cap=10.0)[0, 2] == pytest.approx(torch.e ** 2)


def test_collate_carries_sampling_logprobs_through_rows():
    r = Rollouts(prompt_ids=[[3, 4], [5]], completion_ids=[[6, 7, 1], [8]], sampling_logprobs=[[-1, -2, -3], [-4]])
    batch = collate(r, pad_id=0)
    assert batch.sampling_logp.tolist() == [[-1, -2, -3], [-4, 0, 0]]
    assert batch.rows([1]).sampling_logp.tolist() == [[-4]]
    assert collate(Rollouts([[3]], [[4]]), pad_id=0).sampling_logp is None


def _trainer(tiny_model, fused: bool, cap: float | None) -> Trainer:
    cfg = TrainConfig.from_mapping({"model": str(tiny_model), "layers": str(LAYER), "prompts_per_step": 4,
                                    "num_generations": 4, "micro_batch_size": 3, "fused_loss": fused,
                                    "dtype": "float32", "max_completion_length": 8, "seed": 3, "tis_cap": cap,
                                    "rollout": "hf"})
    return Trainer(cfg, task=DigitShareTask())


def _batch_with_sampler_logprobs(trainer: Trainer, shift: float):
    """A rollout batch whose 'sampler' log-probs are the trainer's own, moved by +-shift per token."""
    sb = trainer.rollout_batch()
    with torch.no_grad():
        logp = completion_logprobs(trainer.model, sb.batch)
    sign = torch.where(torch.arange(logp.numel()).view(logp.shape) % 2 == 0, 1.0, -1.0)
    sb.batch.sampling_logp = (logp + shift * sign) * sb.batch.completion_mask
    return sb, logp


@pytest.mark.parametrize("fused", [True, False])
def test_tis_gradient_matches_weighted_autograd(tiny_model, fused):
    trainer = _trainer(tiny_model, fused, cap=1.5)
    sb, logp = _batch_with_sampler_logprobs(trainer, shift=0.7)
    trainer.attach_prefix(sb)
    trainer.accumulate_gradients(sb)
    model, _ = load_model(tiny_model, dtype="float32", device="cpu")
    lp = completion_logprobs(model, sb.batch)
    w = tis_weights(lp, sb.batch.sampling_logp, 1.5, sb.batch.completion_mask)
    assert w.max() == 1.5 and w.min() < 0.6  # both the cap and down-weighting are exercised
    tl = per_token_loss(lp, lp.detach(), sb.advantages, 0.2, 0.2, tis=w)
    (tl.loss * sb.weights).sum().backward()
    for name, param in trainer.trained.items():
        ref = dict(model.named_parameters())[name].grad
        rel = (param.grad - ref).norm() / ref.norm()
        assert rel <= 1e-5, f"{name}: relative error {rel:.2e}"


def test_tis_with_on_policy_sampler_changes_nothing(tiny_model):
    grads = []
    for cap in (None, 2.0):
        trainer = _trainer(tiny_model, True, cap)
        sb, _ = _batch_with_sampler_logprobs(trainer, shift=0.0)
        trainer.accumulate_gradients(sb)
        grads.append({n: p.grad.clone() for n, p in trainer.trained.items()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-8), name
