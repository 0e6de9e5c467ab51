"""Training only layer k gives layer k the same gradient as full-parameter autograd on the same batch."""
from __future__ import annotations

import pytest
import torch
from helpers import DigitShareTask

from sparselayer.config import TrainConfig
from sparselayer.model.layout import load_model
from sparselayer.model.logprobs import completion_logprobs
from sparselayer.objective import per_token_loss
from sparselayer.trainer import Trainer

LAYER = 2


def _trainer(tiny_model, loss_type: str, layers: str = str(LAYER), fused: bool = True) -> Trainer:
    cfg = TrainConfig.from_mapping({"model": str(tiny_model), "layers": layers, "prompts_per_step": 4,
                                    "fused_loss": fused,
                                    "num_generations": 4, "micro_batch_size": 3, "loss_type": loss_type,
                                    "dtype": "float32", "max_completion_length": 8, "seed": 3,
                                    "epsilon_high": 5.0 if loss_type == "cispo" else None})
    return Trainer(cfg, task=DigitShareTask())


def _full_parameter_grads(tiny_model, sb, temperature: float, loss_type: str) -> dict[str, torch.Tensor]:
    """Plain reference: every parameter trainable, one forward over the whole padded batch, no micro-batches."""
    model, _ = load_model(tiny_model, dtype="float32", device="cpu")
    model.train()
    logp = completion_logprobs(model, sb.batch, temperature)
    tl = per_token_loss(logp, logp.detach(), sb.advantages, 0.2, 5.0 if loss_type == "cispo" else 0.2,
                        loss_type=loss_type)
    (tl.loss * sb.weights).sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if n.startswith(f"model.layers.{LAYER}.")}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo", "cispo"])
def test_layer_gradient_matches_full_parameter_autograd(tiny_model, loss_type, cached, fused):
    trainer = _trainer(tiny_model, loss_type, fused=fused)
    assert trainer.fused == fused
    sb = trainer.rollout_batch()
    if cached:
        trainer.attach_prefix(sb)
        assert sb.inputs.items is not None and len(sb.inputs.items) == len(sb.micro_batches)
    assert sb.advantages.abs().sum() > 0, "the batch must carry signal"
    assert len(sb.micro_batches) > 1
    trainer.accumulate_gradients(sb)
    reference = _full_parameter_grads(tiny_model, sb, trainer.config.rollout.temperature, loss_type)
    assert set(reference) == set(trainer.trained)
    for name, param in trainer.trained.items():
        ref = reference[name]
        assert torch.isfinite(param.grad).all()
        assert ref.norm() > 0
        rel = (param.grad - ref).norm() / ref.norm()
        assert rel <= 1e-5, f"{name}: relative error {rel:.2e}"


def test_frozen_parameters_hold_no_gradients_or_optimizer_state(tiny_model):
    trainer = _trainer(tiny_model, "dapo")
    trainer.step()
    for name, param in trainer.model.named_parameters():
        if name in trainer.trained:
            assert param.grad is not None
        else:
            assert param.grad is None and not param.requires_grad, name
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in trainer.trained.values()}
    assert len(trainer.optimizer.state) == len(trainer.trained)
