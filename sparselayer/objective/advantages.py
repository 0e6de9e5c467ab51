"""Group-relative advantages: each completion's reward measured against its own prompt's group (GRPO), and
for multi-turn episodes GiGPO's sum of an episode-level and a step-level (anchor-state) advantage."""
from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

SCALE_REWARDS = ("group", "batch", "none")
ADVANTAGES = ("grpo", "gigpo")  # --advantage: episode-level only, or episode- plus step-level (multi-turn)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """A_i = r_i - mean(group), divided by the group's (or the batch's) std unless scale is 'none' (Dr. GRPO).

    Rows are prompt-major: completions i*n .. i*n+n-1 answer prompt i.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    groups = rewards.view(-1, num_generations)
    adv = (groups - groups.mean(dim=1, keepdim=True)).view(-1)
    if scale_rewards == "group":
        adv = adv / (groups.std(dim=1).repeat_interleave(num_generations) + 1e-4)
    elif scale_rewards == "batch":
        adv = adv / (rewards.std() + 1e-4)
    return adv


def discounted_returns(rewards: torch.Tensor, episodes: Sequence[int], gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} within each episode: the discounted return-to-go of every step.

    Rows are steps, each episode's in turn order (an episode's rows need not be contiguous)."""
    out = torch.zeros_like(rewards, dtype=torch.float32)
    following: dict[int, float] = {}  # per episode: the return-to-go of its next step
    for row in reversed(range(len(episodes))):
        following[episodes[row]] = float(rewards[row]) + gamma * following.get(episodes[row], 0.0)
        out[row] = following[episodes[row]]
    return out


def gigpo_advantages(rewards: torch.Tensor, episodes: Sequence[int], anchors: Sequence[Hashable],
                     num_generations: int, gamma: float = 0.95, step_weight: float = 1.0,
                     scale_rewards: str = "group") -> torch.Tensor:
    """GiGPO (arXiv 2505.10978): each step's advantage is its episode's GRPO advantage plus `step_weight`
    (omega) times a step advantage measured within its anchor-state group. Rows are steps: row j is turn t
    of episode i = episodes[j], with reward r_{i,t} = rewards[j] and observation anchors[j]; episodes are
    numbered 0..E-1, group g holding episodes g*n .. g*n+n-1 (n = num_generations, prompt-major as in
    `group_advantages`), each episode's rows in turn order.

        episode return      R_i = sum_t r_{i,t}
        episode advantage   A^E_i = group_advantages(R, n, scale_rewards)_i          (GRPO, unchanged)
        return-to-go        G_{i,t} = sum_{k >= t} gamma^(k-t) r_{i,k}
        anchor group        U(g, s) = {(i, t) : i in group g, observation of (i, t) == s}
        step advantage      A^S_{i,t} = (G_{i,t} - mean_U G) / (std_U G + 1e-4)     (scale_rewards group;
                            batch: the std of every step's G instead; none: no division); 0 when |U| = 1
        advantage           A_{i,t} = A^E_i + omega * A^S_{i,t}

    std is the sample std, as in `group_advantages`. step_weight 0: every step gets its episode's GRPO
    advantage (GRPO on a multi-turn task).
    """
    num_episodes = max(episodes) + 1
    if num_episodes % num_generations:
        raise ValueError(f"{num_episodes} episodes do not form groups of {num_generations}")
    returns = torch.zeros(num_episodes, dtype=torch.float32).index_add_(
        0, torch.tensor(list(episodes)), rewards.float())
    index = torch.tensor(list(episodes))
    advantages = group_advantages(returns, num_generations, scale_rewards)[index]
    if step_weight == 0:
        return advantages
    return advantages + step_weight * _anchor_advantages(discounted_returns(rewards, episodes, gamma), episodes,
                                                         anchors, num_generations, scale_rewards)


def _anchor_advantages(values: torch.Tensor, episodes: Sequence[int], anchors: Sequence[Hashable],
                       num_generations: int, scale_rewards: str) -> torch.Tensor:
    """Each step's value against the other steps of its anchor group (same group, same observation); 0 alone."""
    members: dict[tuple[int, Hashable], list[int]] = {}
    for row, (episode, anchor) in enumerate(zip(episodes, anchors)):
        members.setdefault((episode // num_generations, anchor), []).append(row)
    out = torch.zeros_like(values)
    per_group = "group" if scale_rewards == "group" else "none"  # batch: one std for every step, below
    for rows in members.values():
        if len(rows) > 1:
            out[rows] = group_advantages(values[rows], len(rows), per_group)
    return out / (values.std() + 1e-4) if scale_rewards == "batch" else out
