"""Tasks: prompts, reference answers and rewards, or (multi-turn) an environment's episodes. `build_task`
and `task_from_config` turn settings into a Task."""
from __future__ import annotations

import functools
from typing import Any

from ..config import TaskConfig
from ..errors import ConfigError
from .arithmetic import ArithmeticTask
from .base import Example, Task
from .envs import ChainEnv, EnvTask, load_environment
from .rewards import DEFAULT_FORMAT_PATTERN, RewardBatch, RewardedTask, RewardFunction, RewardSet, reward_set_of
from .user_reward import RewardItem, with_rewards


def chain_task(turns: int = 3, per_turn_reward: bool = False, max_turns: int = 10, history_length: int = 0) -> EnvTask:
    """The built-in multi-turn task: `turns` additions onto a running total (sparselayer.tasks.envs.chain)."""
    return EnvTask(functools.partial(ChainEnv, turns, per_turn_reward), "chain", max_turns, history_length)


BUILTIN_TASKS = {"arithmetic": ArithmeticTask, "chain": chain_task}
DatasetSource = Any  # a data file or folder path, a datasets.Dataset or DatasetDict, a list of dicts, or None


def _given(dataset: DatasetSource) -> bool:
    """Whether a dataset setting is given (None and blank text are not)."""
    return dataset is not None and not (isinstance(dataset, str) and not dataset.strip())


def build_task(task: str | None = None, dataset: DatasetSource = None,
               reward: RewardItem | list[RewardItem] | None = None, reward_weights: list[float] | None = None,
               format_pattern: str = DEFAULT_FORMAT_PATTERN, *, dataset_split: str | None = None,
               eval_dataset: DatasetSource = None) -> Task:
    """The built-in task `task`, or a prompt/answer file `dataset`, scored by its own reward or by the weighted
    sum of `reward` (built-in names, "module:function" specs, which run that code, or callables).

    `dataset`: a JSONL/Parquet/CSV file or save_to_disk folder, a datasets.Dataset or DatasetDict, or a list of
    dicts; `dataset_split` the split to train on, `eval_dataset` held-out rows from another such source."""
    if _given(dataset):
        from .dataset import dataset_task

        base = dataset_task(dataset, split=dataset_split, eval_data=eval_dataset if _given(eval_dataset) else None)
    elif dataset_split is not None or _given(eval_dataset):
        raise ConfigError("--dataset-split and --eval-dataset go with --dataset (a built-in task has its own splits)")
    elif (task or "arithmetic") in BUILTIN_TASKS:
        base = BUILTIN_TASKS[task or "arithmetic"]()
    else:
        raise ConfigError(f"unknown task {task!r}: built-in tasks are {', '.join(BUILTIN_TASKS)}")
    return with_rewards(base, reward or None, reward_weights, format_pattern)


def task_from_config(t: TaskConfig, task: Task | None = None) -> Task:
    """The task of the settings (built-in task or dataset), or `task` when given, scored by --reward (with
    --reward-weights); a task passed in must then carry no rewards of its own."""
    if task is not None:
        return with_rewards(task, t.reward, t.reward_weights, t.format_pattern)
    if t.env:
        return EnvTask(load_environment(t.env), t.env.rpartition(":")[2], t.max_turns, t.history_length)
    if t.task == "chain":
        return chain_task(t.chain_turns, t.per_turn_reward, t.max_turns, t.history_length)
    return build_task(t.task, t.dataset, reward=t.reward, reward_weights=t.reward_weights,
                      format_pattern=t.format_pattern, dataset_split=t.dataset_split, eval_dataset=t.eval_dataset)


__all__ = ["ArithmeticTask", "BUILTIN_TASKS", "EnvTask", "Example", "RewardBatch", "RewardFunction", "RewardSet",
           "RewardedTask", "Task", "build_task", "chain_task", "reward_set_of", "task_from_config", "with_rewards"]
