"""The order in which training prompts are drawn: seeded, epoch-wise shuffled, resumable by position."""
from __future__ import annotations

import functools
import random


class PromptSampler:
    """Epoch-wise shuffled prompt order, fully determined by the seed and the position (resumable)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed

    def take(self, position: int, count: int) -> list[int]:
        """Indices of the prompts at positions position .. position+count-1 of the endless order."""
        return [epoch_order(self.size, self.seed, pos // self.size)[pos % self.size]
                for pos in range(position, position + count)]


@functools.lru_cache(maxsize=4)
def epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of one epoch's prompt indices."""
    order = list(range(size))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return order
