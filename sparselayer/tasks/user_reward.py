"""User reward functions: loaded from "module:function" or "file.py:function", or given as callables.

`resolve_rewards` turns --reward values (built-in names, specs) and Python callables into
`RewardFunction`s, and `with_rewards` puts them, weighted, on a task (sparselayer.tasks.rewards calls
them in TRL's convention). A spec that cannot be loaded is a one-line RewardError naming it.
`wrap_task_with_reward` and `RewardFunctionTask` are the single-function form of before.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sparselayer.errors import ConfigError
from sparselayer.tasks.base import Task
from sparselayer.tasks.rewards import (
    BUILTIN_REWARDS,
    DEFAULT_FORMAT_PATTERN,
    RewardedTask,
    RewardFunction,
    RewardSet,
    builtin_reward,
    describe,
    reward_error,
    task_reward,
)

_ATTRIBUTE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_SPEC_HELP = "expected 'module:function' or 'path/to/file.py:function'"


def _split_spec(spec: str) -> tuple[str, str]:
    """(module or file, attribute path) of a spec; the last ':' separates them (Windows drives keep theirs)."""
    source, sep, attribute = spec.strip().rpartition(":")
    if not sep or not source.strip() or not _ATTRIBUTE.fullmatch(attribute.strip()):
        raise reward_error(spec, _SPEC_HELP)
    return source.strip(), attribute.strip()


def _is_file_source(source: str) -> bool:
    """Whether the source part names a Python file rather than an importable module."""
    return source.endswith(".py") or "/" in source or "\\" in source


def _import_file(spec: str, source: str) -> Any:
    """Import a Python file by path under a private module name derived from its location."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise reward_error(spec, f"file not found: {path}")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"_sparselayer_reward_{stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise reward_error(spec, f"cannot import {path} as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        sys.modules.pop(name, None)
        raise reward_error(spec, f"importing {path} failed: {describe(e)}") from None
    return module


def _import_module(spec: str, source: str) -> Any:
    """Import a module by dotted name, telling "not found" apart from "failed while importing"."""
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as e:
        if e.name and (source == e.name or source.startswith(e.name + ".")):
            raise reward_error(spec, f"module '{source}' not found") from None
        raise reward_error(spec, f"importing module '{source}' failed: {describe(e)}") from None
    except (Exception, SystemExit) as e:
        raise reward_error(spec, f"importing module '{source}' failed: {describe(e)}") from None


def _resolve(spec: str, module: Any, attribute: str) -> Callable:
    """The (possibly dotted) attribute of a module, which must be callable."""
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise reward_error(spec, f"'{getattr(module, '__name__', module)}' has no attribute '{attribute}'")
        target = getattr(target, part)
    if not callable(target):
        raise reward_error(spec, f"'{attribute}' is a {type(target).__name__}, not a function")
    return target


def load_reward_function(spec: str) -> Callable:
    """Load the user's reward function named by "module:function" or "path/to/file.py:function"."""
    source, attribute = _split_spec(spec)
    module = _import_file(spec, source) if _is_file_source(source) else _import_module(spec, source)
    return _resolve(spec, module, attribute)


RewardItem = str | Callable[..., Any] | RewardFunction  # a built-in name, a spec, a callable, or ready-made


def resolve_reward(item: RewardItem, task: Task | None = None, format_pattern: str = DEFAULT_FORMAT_PATTERN
                   ) -> RewardFunction:
    """One reward: a built-in by name (accuracy, format, code_tests), a "module:function" / "file.py:function" spec
    (imported: this runs that code), a callable in TRL's convention, or a RewardFunction as it is."""
    if isinstance(item, RewardFunction):
        return item
    if isinstance(item, str):
        name = item.strip()
        if name in BUILTIN_REWARDS:
            return builtin_reward(name, task, format_pattern)
        if ":" not in name:
            raise reward_error(item, f"not a built-in reward ({', '.join(BUILTIN_REWARDS)}); {_SPEC_HELP}")
        fn = load_reward_function(name)
        return RewardFunction(getattr(fn, "__name__", None) or name.rpartition(":")[2], fn, name)
    if callable(item):
        return RewardFunction.of(item)
    raise ConfigError(f"a reward must be a built-in name, 'module:function' or a callable, got {type(item).__name__}")


def resolve_rewards(items: Sequence[RewardItem], task: Task | None = None,
                    format_pattern: str = DEFAULT_FORMAT_PATTERN) -> list[RewardFunction]:
    """Every reward of a --reward list (or a Python list mixing names, specs and callables), in order."""
    if isinstance(items, (str, RewardFunction)) or callable(items):
        items = [items]
    return [resolve_reward(item, task, format_pattern) for item in items]


def with_rewards(task: Task, rewards: RewardItem | Sequence[RewardItem] | None = None,
                 weights: Sequence[float] | None = None, format_pattern: str = DEFAULT_FORMAT_PATTERN) -> Task:
    """`task` scored by the weighted sum of `rewards` (unset: its own reward, as `task`, weighted); the task
    itself when neither is given. Accuracy (is_correct) and the data stay the task's."""
    if rewards is None and weights is None:
        return task
    if isinstance(task, RewardedTask):
        raise ConfigError("the task already has reward functions: give rewards either with the task or in the "
                          "settings (--reward), not both")
    functions = resolve_rewards(rewards, task, format_pattern) if rewards else [task_reward(task)]
    return RewardedTask(task, RewardSet(functions, weights))


class RewardFunctionTask(RewardedTask):
    """A task whose rewards come from one user function (`fn`, named by `spec`); kept for callers of before."""

    def __init__(self, base: Task, fn: Callable, spec: str) -> None:
        super().__init__(base, RewardSet([RewardFunction(getattr(fn, "__name__", None) or spec, fn, spec)]))
        self.fn = fn
        self.spec = spec


def wrap_task_with_reward(task: Task, spec: str | None) -> Task:
    """The task with its reward replaced by the user function named by `spec`; unchanged if None."""
    if spec is None:
        return task
    return RewardFunctionTask(task, load_reward_function(spec), spec)
