"""The step's options agree where they should: reference swap vs copy, the old-policy pass vs the first
pass's own log-probs, and a batch its caller did not prepare stays unprepared (float32, relative 1e-5)."""
from __future__ import annotations

import torch
from helpers import DigitShareTask

from sparselayer.config import TrainConfig
from sparselayer.model.reference import swapped_in
from sparselayer.trainer import Trainer


def _trainer(model, **extra) -> Trainer:
    cfg = TrainConfig.from_mapping({"model": str(model), "layers": "2", "prompts_per_step": 4, "num_generations": 4,
                                    "micro_batch_size": 5, "dtype": "float32", "quant": "none", "beta": 0.04,
                                    "max_completion_length": 8, "seed": 5, **extra})
    return Trainer(cfg, task=DigitShareTask())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a - b).norm() / b.norm())


def test_reference_copy_and_swap_agree_with_the_untrained_policy(tiny_model):
    swap, copy = _trainer(tiny_model), _trainer(tiny_model, reference="copy")
    assert isinstance(swap.reference, dict) and isinstance(copy.reference, torch.nn.Module) and copy.fused
    sb = swap.rollout_batch()
    swap.attach_prefix(sb)
    policy = swap.policy_logprobs(sb)
    assert _rel(swap.reference_logprobs(sb), policy) <= 1e-6
    assert _rel(copy.reference_logprobs(sb), policy) <= 1e-5


def test_swapped_in_exchanges_values_and_restores_the_same_parameters(tiny_model):
    trainer = _trainer(tiny_model)
    name, param = next(iter(trainer.trained.items()))
    before, storage = param.detach().clone(), param.data_ptr()
    values = {n: torch.randn_like(p) for n, p in trainer.trained.items()}
    wanted = values[name].clone()
    with swapped_in(trainer.trained, values):
        assert torch.equal(trainer.trained[name], wanted) and trainer.trained[name] is param
    assert torch.equal(param, before) and param.data_ptr() == storage and torch.equal(values[name], wanted)


def test_old_logp_pass_gives_the_same_updates_as_the_first_pass_log_probs(tiny_model):
    results = []
    for separate in (False, True):
        trainer = _trainer(tiny_model, num_iterations=2, old_logp_pass=separate, learning_rate=1e-3)
        metrics = trainer.step()
        results.append((metrics, {n: p.detach().clone() for n, p in trainer.trained.items()}))
    (m0, p0), (m1, p1) = results
    assert m0["loss"] == m1["loss"] or abs(m0["loss"] - m1["loss"]) <= 1e-5 * abs(m0["loss"]) + 1e-9
    for name in p0:
        assert _rel(p1[name], p0[name]) <= 1e-6, name


def test_unprepared_batch_runs_full_forwards_and_stays_unprepared(tiny_model):
    trainer = _trainer(tiny_model, beta=0.0)
    sb = trainer.rollout_batch()
    trainer.accumulate_gradients(sb)
    assert sb.inputs is None and sb.old_logp is not None
    assert all(p.grad is not None and p.grad.norm() > 0 for p in trainer.trained.values())
