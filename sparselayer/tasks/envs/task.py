"""A multi-turn task: an environment, the seeds of its training and held-out episodes, and how episodes
are played (turn limit, history length).

Its examples name episodes, not prompts: example i of `train` is the episode with seed i (its prompt is
the text `episode <seed>`, its `seed` column the seed), of `test` the held-out episode HELD_OUT_SEED + i.
The rollout loop (`sparselayer.rollout.episodes`) resets one environment per generation with that seed
and plays the episode; rewards come from the environment, so a multi-turn task takes no --reward.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

from ..base import Example, Task
from .base import HELD_OUT_SEED, EnvFactory, Environment


class EnvTask(Task):
    """Episodes of the environment `make_env` makes: `num_train` training seeds, `num_test` held-out ones."""

    def __init__(self, make_env: EnvFactory, name: str = "env", max_turns: int = 10, history_length: int = 0,
                 num_train: int = 20000, num_test: int = 500):
        if max_turns < 1 or history_length < 0:
            raise ValueError("max_turns must be at least 1 and history_length at least 0")
        self.make_env, self.name = make_env, name
        self.max_turns, self.history_length = max_turns, history_length
        self.num_train, self.num_test = num_train, num_test
        # tokens per action unless --max-completion-length is given: the environment's suggestion
        self.suggested_max_completion_length = getattr(make_env(), "suggested_max_completion_length", 256)

    @cached_property
    def train(self) -> Sequence[Example]:
        """One example per training episode (seeds 0 .. num_train-1)."""
        return [episode_example(seed) for seed in range(self.num_train)]

    @cached_property
    def test(self) -> Sequence[Example]:
        """One example per held-out episode (seeds HELD_OUT_SEED ..)."""
        return [episode_example(HELD_OUT_SEED + i) for i in range(self.num_test)]

    def environment(self) -> Environment:
        """A fresh environment, ready for `reset`."""
        return self.make_env()

    def is_correct(self, completion: str, example: Example) -> bool:
        """Not defined for one completion: an episode's success comes from its environment."""
        raise TypeError(f"task {self.name!r} is multi-turn: its episodes are judged by the environment, "
                        "not single completions (sparselayer.rollout.episodes)")


def episode_example(seed: int) -> Example:
    """The example that names episode `seed`."""
    return Example(f"episode {seed}", None, {"seed": seed})


def env_task_of(task: Task) -> EnvTask | None:
    """The multi-turn task behind `task` (itself, or the task a prompt subset wraps), else None."""
    while not isinstance(task, EnvTask):
        task = getattr(task, "task", None)
        if task is None:
            return None
    return task
