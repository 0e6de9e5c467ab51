"""A step whose loss or gradient norm is not finite is skipped: no optimizer step, no push, counted in the
metrics; --max-consecutive-skips in a row stop the run with one line (the old step turned every trained
tensor into NaN from a single NaN gradient element)."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import DigitShareTask

from sparselayer.config import TrainConfig
from sparselayer.errors import RunError
from sparselayer.rollout.hf import HFRolloutEngine
from sparselayer.trainer import Trainer


class CountingEngine(HFRolloutEngine):
    """The hf engine, recording every weight push it receives."""

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        self.pushes = 0

    def update_weights(self, named_tensors) -> int:
        self.pushes += 1
        return super().update_weights(named_tensors)


def _trainer(model, **extra) -> Trainer:
    cfg = TrainConfig.from_mapping({"model": str(model), "layers": "2", "prompts_per_step": 4, "num_generations": 4,
                                    "dtype": "float32", "quant": "none", "max_completion_length": 6,
                                    "learning_rate": 1e-3, "rollout": "hf", "seed": 3, **extra})
    trainer = Trainer(cfg, task=DigitShareTask())
    trainer.engine = CountingEngine(trainer.model, trainer.tokenizer)
    return trainer


def _poison_once(trainer: Trainer, value: float, steps: int = 1) -> dict[str, int]:
    """Make one gradient element of one trained tensor `value` for the next `steps` backward passes."""
    left = {"n": steps}
    param = next(iter(trainer.trained.values()))

    def hook(grad: torch.Tensor) -> torch.Tensor:
        if left["n"] <= 0:
            return grad
        left["n"] -= 1
        grad = grad.clone()
        grad.view(-1)[0] = value
        return grad

    param.register_hook(hook)
    return left


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.trained.items()}


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_gradient_skips_the_step_and_training_goes_on(tiny_model, value):
    trainer = _trainer(tiny_model, micro_batch_size=16)  # one micro-batch: one backward per pass
    _poison_once(trainer, value)
    before, lr_steps = _weights(trainer), trainer.scheduler.last_epoch
    metrics = trainer.step()
    assert metrics["skipped_steps"] == 1 and not math.isfinite(metrics["grad_norm"])
    after = _weights(trainer)
    assert all(torch.equal(after[n], before[n]) for n in before)  # no optimizer step
    assert trainer.engine.pushes == 0 and metrics["push_bytes"] == 0  # no push
    assert trainer.scheduler.last_epoch == lr_steps  # nor a learning-rate step
    assert all(p.grad is None for p in trainer.trained.values())  # the bad gradient is dropped
    metrics = trainer.step()  # the next batch trains normally
    assert metrics["skipped_steps"] == 1 and math.isfinite(metrics["grad_norm"]) and trainer.engine.pushes == 1
    assert all(torch.isfinite(p).all() for p in trainer.trained.values())
    assert any(not torch.equal(p, before[n]) for n, p in trainer.trained.items())


def test_a_later_pass_that_skips_keeps_the_earlier_passes_update(tiny_model):
    trainer = _trainer(tiny_model, micro_batch_size=16, num_iterations=3)
    param = next(iter(trainer.trained.values()))
    calls = {"n": 0}

    def hook(grad: torch.Tensor) -> torch.Tensor:  # the second pass's gradient is NaN
        calls["n"] += 1
        return grad.clone().fill_(math.nan) if calls["n"] == 2 else grad

    param.register_hook(hook)
    before = _weights(trainer)
    metrics = trainer.step()
    assert calls["n"] == 2  # the third pass does not run
    assert metrics["skipped_steps"] == 1 and trainer.engine.pushes == 1  # pass 0 moved the weights: pushed
    assert any(not torch.equal(p, before[n]) for n, p in trainer.trained.items())
    assert all(torch.isfinite(p).all() for p in trainer.trained.values())


def test_consecutive_skips_stop_the_run_with_one_line(tiny_model):
    trainer = _trainer(tiny_model, micro_batch_size=16, max_consecutive_skips=2)
    _poison_once(trainer, math.nan, steps=3)
    trainer.step()
    with pytest.raises(RunError) as err:
        trainer.step()
    message = str(err.value)
    assert "\n" not in message and "2 steps in a row" in message and "non-finite" in message
    assert all(torch.isfinite(p).all() for p in trainer.trained.values())


def test_skips_must_be_consecutive_to_stop(tiny_model):
    trainer = _trainer(tiny_model, micro_batch_size=16, max_consecutive_skips=2)
    param = next(iter(trainer.trained.values()))
    calls = {"n": 0}

    def hook(grad: torch.Tensor) -> torch.Tensor:  # steps 1 and 3 are bad, step 2 is fine
        calls["n"] += 1
        return grad.clone().fill_(math.nan) if calls["n"] in (1, 3) else grad

    param.register_hook(hook)
    skipped = [trainer.step()["skipped_steps"] for _ in range(3)]
    assert skipped == [1, 1, 2] and trainer.consecutive_skips == 1
