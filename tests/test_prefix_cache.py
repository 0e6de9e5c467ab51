"""The frozen-prefix cache changes nothing but cost: same log-probs, loss and gradients as the plain path."""
from __future__ import annotations

import pytest
import torch
from helpers import DigitShareTask

from sparselayer.config import TrainConfig
from sparselayer.model.forward import CachedPrefixForward, FullForward
from sparselayer.model.logprobs import completion_logprobs
from sparselayer.model.prefix_cache import compute_prefix, logprobs_from_prefix
from sparselayer.trainer import Trainer


def _trainer(model, layers="2", **extra) -> Trainer:
    cfg = TrainConfig.from_mapping({"model": str(model), "layers": layers, "prompts_per_step": 4,
                                    "num_generations": 4, "micro_batch_size": 5, "dtype": "float32",
                                    "max_completion_length": 8, "seed": 11, "beta": 0.04, **extra})
    return Trainer(cfg, task=DigitShareTask())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float(((a - b).norm() / b.norm().clamp(min=1e-30)).detach())


@pytest.mark.parametrize("start", [1, 3])
def test_cached_logprobs_equal_plain_forward(tiny_model, start):
    trainer = _trainer(tiny_model)
    sb = trainer.rollout_batch()
    for rows in sb.micro_batches:
        sub = sb.batch.rows(rows)
        plain = completion_logprobs(trainer.model, sub)
        cached = logprobs_from_prefix(trainer.model, compute_prefix(trainer.model, sub, start), start)
        assert _rel(cached, plain) <= 1e-5


def test_cached_step_gives_same_loss_and_gradient(tiny_model):
    """Issue 3's acceptance check: --quant none, float32, relative 1e-5 (the fused-head variants and the
    full-parameter autograd reference are in test_gradients.py)."""
    trainer = _trainer(tiny_model, quant="none")
    assert trainer.quant == "none" and trainer.model.dtype == torch.float32
    assert isinstance(trainer.forward, CachedPrefixForward)
    sb = trainer.rollout_batch()
    cached_forward, trainer.forward = trainer.forward, FullForward(trainer.model)  # the plain path first
    sb.ref_logp = trainer.policy_logprobs(sb)  # beta > 0: reference pass (uncached)
    plain_stats = trainer.accumulate_gradients(sb)
    plain = {n: p.grad.clone() for n, p in trainer.trained.items()}
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.forward = cached_forward
    trainer.attach_prefix(sb)
    assert _rel(trainer.policy_logprobs(sb), sb.ref_logp) <= 1e-5
    cached_stats = trainer.accumulate_gradients(sb)
    assert cached_stats["loss"] == pytest.approx(plain_stats["loss"], rel=1e-5)
    for name, p in trainer.trained.items():
        assert plain[name].norm() > 0
        assert _rel(p.grad, plain[name]) <= 1e-5, name


def test_prefix_runs_once_per_rollout_batch(tiny_model):
    """With beta > 0 and two optimization passes, the layers below the trained one run once per micro-batch."""
    calls = {}
    for cache, share in ((True, "off"), (True, "on"), (False, "off")):
        trainer = _trainer(tiny_model, layers="2", num_iterations=2, prefix_cache=cache, share_prompts=share)
        state = {"count": 0, "sampling": False}
        trainer.model.model.layers[0].register_forward_hook(
            lambda *a: state.__setitem__("count", state["count"] + (not state["sampling"])))
        generate = trainer.engine.generate

        def counted_generate(*args, **kwargs):  # generation also runs layer 0: not counted
            state["sampling"] = True
            try:
                return generate(*args, **kwargs)
            finally:
                state["sampling"] = False

        trainer.engine.generate = counted_generate
        trainer.step()
        calls[cache, share == "on"] = (state["count"], len(trainer.rollout_batch().micro_batches))
    count, micro = calls[True, False]
    assert count == micro == -(-16 // 5)
    count, micro = calls[True, True]  # whole groups of 4 per micro-batch: a prompt call and a completion call
    assert (count, micro) == (2 * 4, 4)
    count, micro = calls[False, False]
    assert count == 3 * micro  # reference pass + two optimization passes


@pytest.mark.parametrize("cache", [True, False])
def test_gradient_checkpointing_changes_nothing_but_memory(tiny_model, cache):
    grads = {}
    for checkpointing in (False, True):
        trainer = _trainer(tiny_model, prefix_cache=cache, gradient_checkpointing=checkpointing, beta=0.0)
        sb = trainer.rollout_batch()
        trainer.attach_prefix(sb)
        trainer.accumulate_gradients(sb)
        grads[checkpointing] = {n: p.grad.clone() for n, p in trainer.trained.items()}
    for name, plain in grads[False].items():
        assert plain.norm() > 0
        assert _rel(grads[True][name], plain) <= 1e-6, name
