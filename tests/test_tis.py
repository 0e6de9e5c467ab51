"""The sampler importance-sampling correction (--vllm-importance-sampling-*, and --tis-cap, its token_truncate
alias): the weights, their settings, and their effect on the trained layer's gradient."""
from __future__ import annotations

import pytest
import torch
from helpers import DigitShareTask

from sparselayer.batch import Rollouts, collate
from sparselayer.config import TrainConfig
from sparselayer.errors import ConfigError
from sparselayer.model.layout import load_model
from sparselayer.model.logprobs import completion_logprobs
from sparselayer.objective import (
    IS_MODES,
    ObjectiveOptions,
    objective_loss,
    per_token_loss,
    sampling_correction,
    tis_weights,
)
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


def _trainer(tiny_model, fused: bool, cap: float | None, **extra) -> Trainer:
    cfg = TrainConfig.from_mapping({"model": str(tiny_model), "layers": str(LAYER), "prompts_per_step": 4,
                                    "num_generations": 4, "micro_batch_size": 3, "fused_loss": fused,
                                    "dtype": "float32", "max_completion_length": 8, "seed": 3, "tis_cap": cap,
                                    "rollout": "hf", **extra})
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


def test_sampling_correction_modes_and_nan():
    """Token modes weigh each token, sequence modes each sequence by exp of its summed difference; *_truncate
    clamps, *_mask zeroes outside [clip_min, clip_max]; a NaN sampler log-prob is no difference."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, 0.0]])
    sampling = torch.tensor([[-1.0, float("nan"), -1.0], [-2.5, -1.5, float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    e = torch.e
    token = torch.tensor([[1.0, 1.0, e ** 0.5], [e ** -0.5, e ** 0.5, 1.0]])
    assert torch.allclose(sampling_correction(old, sampling, "token_truncate", 0.7, 1.5, mask),
                          token.clamp(0.7, 1.5))
    assert torch.allclose(sampling_correction(old, sampling, "token_mask", 0.7, 1.5, mask),
                          torch.where((token < 0.7) | (token > 1.5), 0.0, token))
    sequence = torch.tensor([[e ** 0.5], [1.0]]).expand(2, 3)
    assert torch.allclose(sampling_correction(old, sampling, "sequence_truncate", None, 1.5, mask),
                          sequence.clamp(max=1.5))
    assert torch.equal(sampling_correction(old, sampling, "sequence_mask", None, 1.5, mask)[0], torch.zeros(3))
    assert torch.allclose(sampling_correction(old, sampling, "sequence_mask", None, None, mask), sequence)
    with pytest.raises(ValueError, match="mode"):
        sampling_correction(old, sampling, "tokens", None, 2.0, mask)


@pytest.mark.parametrize("mode", IS_MODES)
def test_sampling_correction_gradient_matches_weighted_autograd(tiny_model, mode):
    """Each mode through the trainer (fused head, cached prefix) against plain autograd with the same weights,
    NaN sampler log-probs included (float32, relative 1e-5)."""
    trainer = _trainer(tiny_model, True, None, vllm_importance_sampling_mode=mode,
                       vllm_importance_sampling_clip_min=0.8, vllm_importance_sampling_clip_max=1.25)
    sb, _ = _batch_with_sampler_logprobs(trainer, shift=0.15)
    sb.batch.sampling_logp[0, 0] = sb.batch.sampling_logp[5, 1] = float("nan")
    trainer.attach_prefix(sb)
    trainer.accumulate_gradients(sb)
    model, _ = load_model(tiny_model, dtype="float32", device="cpu")
    lp = completion_logprobs(model, sb.batch)
    mask = sb.batch.completion_mask
    w = sampling_correction(lp, sb.batch.sampling_logp, mode, 0.8, 1.25, mask)
    real = w[mask.bool()]
    assert torch.isfinite(w).all() and real.max() > real.min()  # the weights differ: the correction acts
    tl = objective_loss(lp, lp.detach(), sb.advantages, ObjectiveOptions("dapo"), is_weights=w, mask=mask)
    (tl.loss * sb.weights).sum().backward()
    for name, param in trainer.trained.items():
        ref = dict(model.named_parameters())[name].grad
        rel = (param.grad - ref).norm() / ref.norm()
        assert rel <= 1e-5, f"{name}: relative error {rel:.2e}"


def test_tis_cap_is_token_truncate_and_settings_are_checked(tiny_model):
    """--tis-cap X is mode token_truncate with clip max X whatever the mode says; bad settings: one line each."""
    trainer = _trainer(tiny_model, True, 1.5, vllm_importance_sampling_mode="sequence_mask")
    sb, _ = _batch_with_sampler_logprobs(trainer, shift=0.7)
    sub = sb.batch.rows([0, 1])
    old = sub.sampling_logp + 0.5
    torch.testing.assert_close(trainer._sampling_weights(old, sub),
                               tis_weights(old, sub.sampling_logp, 1.5, sub.completion_mask))
    off = _trainer(tiny_model, True, None, vllm_importance_sampling_correction=False)
    assert off._sampling_weights(old, sub) is None
    bad = [({"vllm_importance_sampling_mode": "token"}, "--vllm-importance-sampling-mode must be one of"),
           ({"vllm_importance_sampling_clip_min": 2.0, "vllm_importance_sampling_clip_max": 2.0}, "must be below"),
           ({"vllm_importance_sampling_clip_max": -1.0}, "clip-max must be a finite number >= 0"),
           ({"importance_sampling_level": "group"}, "--importance-sampling-level must be one of"),
           ({"sapo_temperature_neg": 0.0}, "--sapo-temperature-neg must be a positive number"),
           ({"steps_per_generation": 0}, "--steps-per-generation must be at least 1")]
    for settings, message in bad:
        with pytest.raises(ConfigError, match=message):
            TrainConfig.from_mapping(settings).validate()
    defaults = TrainConfig().rl
    assert (defaults.vllm_importance_sampling_correction, defaults.vllm_importance_sampling_mode,
            defaults.vllm_importance_sampling_clip_min, defaults.vllm_importance_sampling_clip_max,
            defaults.use_bias_correction_kl, defaults.importance_sampling_level, defaults.steps_per_generation,
            defaults.sapo_temperature_pos, defaults.sapo_temperature_neg) == (
        True, "sequence_mask", None, 3.0, True, "token", 1, 1.0, 1.05)
