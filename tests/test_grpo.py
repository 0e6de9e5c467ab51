"""GRPO math against direct formulas on fresh random inputs (float64)."""
from __future__ import annotations

import pytest
import torch

from sparselayer.objective import group_advantages, per_token_loss, token_weights


def test_group_advantages_normalize_within_groups():
    torch.manual_seed(0)
    rewards = torch.rand(12, dtype=torch.float64)
    adv = group_advantages(rewards, 4, "group").view(3, 4)
    groups = rewards.view(3, 4)
    expected = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(adv.sum(1), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_scale_rewards_none_is_dr_grpo_and_batch_uses_batch_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    none = group_advantages(rewards, 3, "none")
    torch.testing.assert_close(none, torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(group_advantages(rewards, 3, "batch"), none / (rewards.std() + 1e-4))
    assert torch.equal(group_advantages(torch.ones(6), 3, "group"), torch.zeros(6))


def _mask():
    return torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)


@pytest.mark.parametrize("loss_type,expected", [
    ("grpo", lambda l, m: ((l * m).sum(1) / m.sum(1)).mean()),
    ("dapo", lambda l, m: (l * m).sum() / m.sum()),
    ("dr_grpo", lambda l, m: (l * m).sum() / (m.shape[0] * 8)),
])
def test_token_weights_reproduce_each_loss_type(loss_type, expected):
    torch.manual_seed(1)
    losses, mask = torch.randn(3, 4, dtype=torch.float64), _mask()
    w = token_weights(mask, loss_type, 8, [[0, 1], [2]])
    torch.testing.assert_close((w * losses).sum(), expected(losses, mask).to(w.dtype))


def test_bnpo_is_token_mean_per_micro_batch_averaged():
    torch.manual_seed(2)
    losses, mask = torch.randn(3, 4, dtype=torch.float64), _mask()
    w = token_weights(mask, "bnpo", 8, [[0, 1], [2]])
    first = (losses[:2] * mask[:2]).sum() / mask[:2].sum()
    second = (losses[2] * mask[2]).sum() / mask[2].sum()
    torch.testing.assert_close((w * losses).sum(), ((first + second) / 2).to(w.dtype))


def test_clipped_surrogate_and_k3_kl():
    torch.manual_seed(3)
    logp = torch.randn(4, 5, dtype=torch.float64) * 0.3 - 1
    old = logp + torch.randn(4, 5, dtype=torch.float64) * 0.3
    ref = logp + torch.randn(4, 5, dtype=torch.float64) * 0.1
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=torch.float64)
    out = per_token_loss(logp, old, adv, 0.2, 0.28, beta=0.04, ref_logp=ref)
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    surrogate = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.28) * a)
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    torch.testing.assert_close(out.loss, surrogate + 0.04 * kl)
    torch.testing.assert_close(out.kl, kl)
    assert (kl >= 0).all()
    assert torch.equal(out.clipped, ((ratio < 0.8) & (a < 0)) | ((ratio > 1.28) & (a > 0)))
    assert out.clipped.any() and not out.clipped.all()


def test_on_policy_gradient_is_advantage_weighted_logprob_gradient():
    logp = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.5, -0.5], dtype=torch.float64)
    per_token_loss(logp, logp.detach(), adv, 0.2, 0.2).loss.sum().backward()
    torch.testing.assert_close(logp.grad, -adv[:, None].expand(2, 3))


def test_cispo_is_detached_capped_weight_times_advantage_times_logprob():
    """TRL's CISPO: -sg(min(r, eps_high)) * A * logp; its gradient in logp is -min(r, eps_high) * A."""
    torch.manual_seed(4)
    logp = (torch.randn(4, 6, dtype=torch.float64) * 0.5 - 1).requires_grad_(True)
    old = logp.detach() + torch.randn(4, 6, dtype=torch.float64) * 0.8
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=torch.float64)
    out = per_token_loss(logp, old, adv, 0.2, 2.0, loss_type="cispo")
    ratio = torch.exp(logp.detach() - old)
    weight = ratio.clamp(max=2.0)
    torch.testing.assert_close(out.loss.detach(), -weight * adv[:, None] * logp.detach())
    out.loss.sum().backward()
    torch.testing.assert_close(logp.grad, -weight * adv[:, None])
    assert torch.equal(out.clipped, (ratio > 2.0) & (adv[:, None] > 0))
    assert out.clipped.any() and (ratio > 2.0).any() and not out.clipped.all()


def test_cispo_normalizes_like_dapo_and_needs_epsilon_high():
    from sparselayer.config import TrainConfig
    from sparselayer.errors import ConfigError

    mask = _mask()
    assert torch.equal(token_weights(mask, "cispo", 8, [[0, 1], [2]]), token_weights(mask, "dapo", 8, [[0], [1, 2]]))
    with pytest.raises(ConfigError, match="--epsilon-high"):
        TrainConfig.from_mapping({"loss_type": "cispo"}).validate()
    TrainConfig.from_mapping({"loss_type": "cispo", "epsilon_high": 5.0}).validate()
    with pytest.raises(ValueError, match="unknown loss type"):
        per_token_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2), 0.2, 0.2, loss_type="gspo")
