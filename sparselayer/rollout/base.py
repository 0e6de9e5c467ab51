"""The rollout-engine interface: sample completions for prompts, and receive changed weights.

Engines (transformers' generate, in-process vLLM, a remote `sparselayer serve`) return token ids
only (`sparselayer.batch.Rollouts`); the trainer turns them into padded tensors with
`sparselayer.batch.collate`, so every engine feeds the same training step.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

import torch

from ..batch import Batch, Rollouts, collate  # Batch, collate: re-exported for code written against this module

__all__ = ["Batch", "RolloutEngine", "Rollouts", "collate"]


class RolloutEngine(ABC):
    """What the trainer needs from a generator of completions."""

    @abstractmethod
    def generate(self, prompts: Sequence[str], num_generations: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, greedy: bool = False) -> Rollouts:
        """Sample `num_generations` completions per prompt (greedy: argmax decoding)."""

    @abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load the given tensors (checkpoint names) into the engine's model; return bytes received."""

    def close(self) -> None:  # noqa: B027 (optional hook: engines without resources keep the default)
        """Release what the engine holds (a vLLM engine, an HTTP client); nothing by default."""
