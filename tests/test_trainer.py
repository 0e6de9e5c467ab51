"""The step's options agree where they should: reference swap vs copy, the old-policy pass vs the first
pass's own log-probs, several optimizer steps per rollout batch vs manual steps on its chunks, and a batch
its caller did not prepare stays unprepared (float32, relative 1e-5)."""
from __future__ import annotations

import pytest
import torch
from helpers import DigitShareTask

from sparselayer.batch import StepBatch
from sparselayer.config import TrainConfig
from sparselayer.errors import ConfigError
from sparselayer.model.reference import swapped_in
from sparselayer.objective import step_shares, token_weights
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


@pytest.mark.parametrize("loss_type,num_iterations", [("grpo", 1), ("dapo", 2)])
def test_steps_per_generation_equals_manual_steps_on_the_chunks(tiny_model, loss_type, num_iterations):
    """--steps-per-generation 2: one step() makes 2 x num_iterations optimizer steps, each on a consecutive
    half of the batch's micro-batches, after ONE old-policy pass; the same updates come from manual steps
    on each half as a batch of its own (plain full forwards, one micro-batch), normalised as TRL does
    (grpo: over the half's own sequences; dapo: over the batch's tokens / 2). Adam on both, float32:
    the trained tensors agree within 1e-5 relative."""
    extra = {"steps_per_generation": 2, "num_iterations": num_iterations, "loss_type": loss_type, "beta": 0.0,
             "learning_rate": 1e-3, "micro_batch_size": 3}
    auto, manual = _trainer(tiny_model, **extra), _trainer(tiny_model, **extra)
    calls = []
    policy_logprobs = auto.policy_logprobs
    auto.policy_logprobs = lambda sb: calls.append(1) or policy_logprobs(sb)
    metrics = auto.step()
    assert len(calls) == 1 and metrics["skipped_steps"] == 0
    assert auto.scheduler.last_epoch == 2 * num_iterations  # one scheduler step per optimizer step

    sb = manual.rollout_batch()
    assert torch.equal(sb.batch.input_ids, auto.last_batch.batch.input_ids)  # the same rollouts
    sb.old_logp = manual.policy_logprobs(sb)
    micro, mask = auto.last_batch.micro_batches, sb.batch.completion_mask
    halves = [[r for j in share for r in micro[j]] for share in step_shares(len(micro), 2)]
    assert len(micro) >= 3 and all(halves)
    for _ in range(num_iterations):
        for rows in halves:
            manual.optimize(_chunk(sb, rows, loss_type, float(mask.sum()) / 2), iteration=1)  # reads sb.old_logp
    for name, param in auto.trained.items():
        assert _rel(param.detach(), manual.trained[name].detach()) <= 1e-5, name
    moved = [_rel(p.detach(), initial) for p, initial in zip(auto.trained.values(), _initial(tiny_model, auto))]
    assert max(moved) > 1e-4  # the steps did move the layer


def _chunk(sb: StepBatch, rows: list[int], loss_type: str, tokens_per_step: float) -> StepBatch:
    """Rows of `sb` as a batch of their own: one micro-batch, old log-probs from the whole batch's pass, token
    weights over the chunk's own sequences (grpo) or the batch's tokens per step (dapo)."""
    batch = sb.batch.rows(rows)
    c = batch.completion_mask.shape[1]
    mask = batch.completion_mask.float()
    weights = token_weights(mask, loss_type, 8, [list(range(len(rows)))]) if loss_type == "grpo" else (
        mask / tokens_per_step)
    chunk = StepBatch(batch, sb.rewards[rows], sb.correct[rows], sb.advantages[rows], [list(range(len(rows)))],
                      weights)
    chunk.old_logp = sb.old_logp[rows, :c]
    return chunk


def _initial(model, trainer: Trainer) -> list[torch.Tensor]:
    fresh = _trainer(model)
    return [fresh.trained[n].detach() for n in trainer.trained]


def test_steps_per_generation_needs_enough_micro_batches(tiny_model):
    trainer = _trainer(tiny_model, steps_per_generation=8, micro_batch_size=8, beta=0.0)
    with pytest.raises(ConfigError, match="--steps-per-generation 8 needs at least 8 micro-batches"):
        trainer.step()
