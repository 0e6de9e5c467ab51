"""GiGPO's advantages against values worked out by hand from the paper's equations (arXiv 2505.10978), and its
episode part against group_advantages (float32, absolute 1e-5)."""
from __future__ import annotations

import pytest
import torch

from sparselayer.objective import discounted_returns, gigpo_advantages, group_advantages

# Two groups of three episodes (num_generations 3); rows are steps, each episode's in turn order.
#   group 0: episode 0: A (r 0) -> B (r 1)            return 1
#            episode 1: A (r 0) -> C (r 0) -> B (r 1)  return 1
#            episode 2: A (r 0) -> B (r 0)            return 0
#   group 1: episodes 3, 4, 5: A (r 1) each           return 1 each
EPISODES = [0, 0, 1, 1, 1, 2, 2, 3, 4, 5]
ANCHORS = ["A", "B", "A", "C", "B", "A", "B", "A", "A", "A"]
REWARDS = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0])


def test_discounted_returns_by_hand():
    # gamma 0.5: episode 0: G = 0 + 0.5 * 1 = 0.5, then 1; episode 1: G_2 = 1, G_1 = 0 + 0.5 * 1 = 0.5,
    # G_0 = 0 + 0.5 * 0.5 = 0.25; episode 2: 0, 0; episodes 3-5: 1 each
    expected = [0.5, 1.0, 0.25, 0.5, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert torch.allclose(discounted_returns(REWARDS, EPISODES, 0.5), torch.tensor(expected), atol=1e-6)


def test_gigpo_by_hand_group_scaling():
    # Episode advantages (group 0): returns 1, 1, 0: mean 2/3, sample std sqrt(((1/3)^2 * 2 + (2/3)^2) / 2)
    # = sqrt(1/3) = 0.577350; A^E = (1/3) / (0.577350 + 1e-4) = 0.577250 for episodes 0 and 1, and
    # (-2/3) / 0.577450 = -1.154500 for episode 2. Group 1: returns all 1, std 0: A^E = 0.
    # Step advantages, gamma 0.5 (returns-to-go of test_discounted_returns_by_hand):
    #   anchor A of group 0: G = 0.5, 0.25, 0: mean 0.25, std sqrt((0.0625 * 2) / 2) = 0.25:
    #       A^S = 0.25 / 0.2501 = 0.999600, 0, -0.999600
    #   anchor B of group 0: G = 1, 1, 0: as the episode returns: 0.577250, 0.577250, -1.154500
    #   anchor C of group 0: one step (a singleton): A^S = 0
    #   anchor A of group 1: G = 1, 1, 1: A^S = 0 (were the groups mixed, A would hold 0.5, 0.25, 0, 1, 1, 1)
    # A = A^E + 0.5 * A^S:
    expected = [0.577250 + 0.5 * 0.999600,   # episode 0, A: 1.077050
                0.577250 + 0.5 * 0.577250,   # episode 0, B: 0.865875
                0.577250 + 0.5 * 0.0,        # episode 1, A: 0.577250
                0.577250 + 0.5 * 0.0,        # episode 1, C (singleton)
                0.577250 + 0.5 * 0.577250,   # episode 1, B: 0.865875
                -1.154500 + 0.5 * -0.999600,  # episode 2, A: -1.654300
                -1.154500 + 0.5 * -1.154500,  # episode 2, B: -1.731750
                0.0, 0.0, 0.0]
    got = gigpo_advantages(REWARDS, EPISODES, ANCHORS, 3, gamma=0.5, step_weight=0.5)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, torch.tensor(expected), atol=1e-5)


def test_gigpo_by_hand_without_scaling():
    # scale none: A^E = R - mean: 1/3, 1/3, -2/3 (group 0), 0 (group 1); A^S (gamma 0.5, omega 1):
    # anchor A of group 0: 0.5 - 0.25, 0.25 - 0.25, 0 - 0.25; anchor B: 1/3, 1/3, -2/3; C and group 1: 0
    third = 1 / 3
    expected = [third + 0.25, third + third, third + 0.0, third + 0.0, third + third,
                -2 * third - 0.25, -2 * third - 2 * third, 0.0, 0.0, 0.0]
    got = gigpo_advantages(REWARDS, EPISODES, ANCHORS, 3, gamma=0.5, step_weight=1.0, scale_rewards="none")
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)


def test_gigpo_batch_scaling_divides_step_part_by_the_std_of_every_step_return():
    # centred within anchor groups as above (scale none), then divided by the std of all ten returns-to-go
    g = discounted_returns(REWARDS, EPISODES, 0.5)
    centred = gigpo_advantages(REWARDS, EPISODES, ANCHORS, 3, 0.5, 1.0, "none") - \
        gigpo_advantages(REWARDS, EPISODES, ANCHORS, 3, 0.5, 0.0, "none")
    episode = gigpo_advantages(REWARDS, EPISODES, ANCHORS, 3, 0.5, 0.0, "batch")
    got = gigpo_advantages(REWARDS, EPISODES, ANCHORS, 3, 0.5, 1.0, "batch")
    assert torch.allclose(got, episode + centred / (g.std() + 1e-4), atol=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_episode_part_is_grpo_on_episode_returns(scale):
    # omega 0 (GRPO on a multi-turn task): every step gets group_advantages of its episode's return
    returns = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    per_episode = group_advantages(returns, 3, scale)
    got = gigpo_advantages(REWARDS, EPISODES, ANCHORS, 3, gamma=0.5, step_weight=0.0, scale_rewards=scale)
    assert torch.allclose(got, per_episode[torch.tensor(EPISODES)], atol=1e-6)


def test_random_groups_episode_part_and_shuffled_rows():
    # fresh random rewards: omega 0 matches group_advantages; rows of different episodes may interleave
    gen = torch.Generator().manual_seed(0)
    episodes = [e for e in range(8) for _ in range(3)]
    rewards = torch.rand(len(episodes), generator=gen)
    anchors = [f"s{int(x)}" for x in torch.randint(0, 3, (len(episodes),), generator=gen)]
    returns = rewards.view(8, 3).sum(dim=1)
    got = gigpo_advantages(rewards, episodes, anchors, 4, 0.9, 0.0)
    assert torch.allclose(got, group_advantages(returns, 4)[torch.tensor(episodes)], atol=1e-5)
    order = [j for t in range(3) for j in range(t, len(episodes), 3)]  # turn-major: episodes interleave
    full = gigpo_advantages(rewards, episodes, anchors, 4, 0.9, 1.0)
    shuffled = gigpo_advantages(rewards[order], [episodes[j] for j in order], [anchors[j] for j in order], 4, 0.9)
    assert torch.isfinite(full).all()
    assert torch.allclose(shuffled, full[order], atol=1e-5)


def test_incomplete_groups_are_refused():
    with pytest.raises(ValueError, match="groups of 3"):
        gigpo_advantages(torch.zeros(4), [0, 1, 2, 3], ["a"] * 4, 3)
