"""Tasks: prompts, reference answers and rewards. `build_task` turns settings into a Task."""
from __future__ import annotations

from ..errors import ConfigError
from .arithmetic import ArithmeticTask
from .base import Example, Task

BUILTIN_TASKS = {"arithmetic": ArithmeticTask}


def build_task(task: str | None = None, dataset: str | None = None, reward: str | list[str] | None = None) -> Task:
    """The built-in task `task`, or a prompt/answer file `dataset`, optionally scored by a user reward."""
    from .user_reward import wrap_task_with_reward

    if dataset:
        from .dataset import load_dataset_task

        base = load_dataset_task(dataset)
    elif (task or "arithmetic") in BUILTIN_TASKS:
        base = BUILTIN_TASKS[task or "arithmetic"]()
    else:
        raise ConfigError(f"unknown task {task!r}: built-in tasks are {', '.join(BUILTIN_TASKS)}")
    if isinstance(reward, list):  # interim: one user function until several are combined
        reward = reward[0] if reward else None
    return wrap_task_with_reward(base, reward)


__all__ = ["ArithmeticTask", "BUILTIN_TASKS", "Example", "Task", "build_task"]
