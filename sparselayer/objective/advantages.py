"""Group-relative advantages: each completion's reward measured against its own prompt's group."""
from __future__ import annotations

import torch

SCALE_REWARDS = ("group", "batch", "none")


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
