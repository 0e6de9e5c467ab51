"""The task interface: prompts with reference answers, a reward, and a held-out split."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant" | ..., "content": text}
Prompt = str | Sequence[Message]  # TRL's standard (text) or conversational (a list of messages) prompt


def completion_text(completion: Any) -> str:
    """The text of a completion in either TRL form: text, or a list of messages (their contents joined)."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content") or "") for m in completion if isinstance(m, Mapping))


@dataclass(frozen=True)
class Example:
    """One prompt, the reference answer its completion is judged against (None: the task's rewards need
    none), and every other column of its data row (they reach reward functions as keyword arguments).

    `source` says where the row came from ("train.jsonl line 12"), so that an error found later (a
    prompt too long for the model's context, a chat template that fails on it) can name the row;
    empty for prompts made in code.
    """

    prompt: Prompt
    answer: str | None = None
    columns: Mapping[str, Any] = field(default_factory=dict, compare=False)
    source: str = field(default="", compare=False, repr=False)


class Task(ABC):
    """A source of training prompts, held-out prompts and a verifiable reward.

    `train` and `test` are disjoint; `reward` scores one completion (higher is better) and
    `is_correct` decides accuracy for evaluation. Rewards for a batch go through `rewards`,
    which a task may override to call a batched user function.
    """

    name: str = "task"
    suggested_max_completion_length: int = 256  # used when --max-completion-length is not given

    @property
    @abstractmethod
    def train(self) -> Sequence[Example]:
        """Training prompts."""

    @property
    @abstractmethod
    def test(self) -> Sequence[Example]:
        """Held-out prompts, never used for training."""

    @abstractmethod
    def is_correct(self, completion: str, example: Example) -> bool:
        """Whether `completion` answers `example` correctly."""

    def reward(self, completion: str, example: Example) -> float:
        """Scalar reward of one completion; 1.0 if correct else 0.0 by default."""
        return 1.0 if self.is_correct(completion, example) else 0.0

    def rewards(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        """Rewards of a batch of completions, one per (completion, example) pair."""
        return [self.reward(c, e) for c, e in zip(completions, examples)]


class ListTask(Task):
    """A task whose training and held-out prompts are lists held in memory."""

    def __init__(self, name: str, train: Sequence[Example], test: Sequence[Example]) -> None:
        self.name, self._train, self._test = name, list(train), list(test)

    @property
    def train(self) -> Sequence[Example]:
        """Training prompts."""
        return self._train

    @property
    def test(self) -> Sequence[Example]:
        """Held-out prompts, disjoint from `train`."""
        return self._test
