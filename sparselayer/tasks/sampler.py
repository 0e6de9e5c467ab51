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
        return [self._order(pos // self.size)[pos % self.size] for pos in range(position, position + count)]

    @functools.lru_cache(maxsize=2)
    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        random.Random(self.seed * 7919 + epoch).shuffle(order)
        return order
