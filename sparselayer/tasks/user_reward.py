"""User reward functions in TRL's convention, loaded from "module:function" or "file.py:function".

The function is called once per batch as fn(prompts=..., completions=..., answer=...) and must
return one finite number per completion; anything else is a one-line RewardError naming the spec.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sparselayer.errors import RewardError
from sparselayer.tasks.base import Example, Task

_ATTRIBUTE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_SPEC_HELP = "expected 'module:function' or 'path/to/file.py:function'"


def _first_line(text: Any) -> str:
    """First non-empty line of a message, so errors stay one line."""
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def _describe(exc: BaseException) -> str:
    """An exception as "Type: first line of its message" (just the type when it has no message)."""
    message = _first_line(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _error(spec: str, detail: str) -> RewardError:
    """A one-line RewardError naming the reward spec."""
    return RewardError(f"reward function '{_first_line(spec)}': {detail}")


def _split_spec(spec: str) -> tuple[str, str]:
    """(module or file, attribute path) of a spec; the last ':' separates them (Windows drives keep theirs)."""
    source, sep, attribute = spec.strip().rpartition(":")
    if not sep or not source.strip() or not _ATTRIBUTE.fullmatch(attribute.strip()):
        raise _error(spec, _SPEC_HELP)
    return source.strip(), attribute.strip()


def _is_file_source(source: str) -> bool:
    """Whether the source part names a Python file rather than an importable module."""
    return source.endswith(".py") or "/" in source or "\\" in source


def _import_file(spec: str, source: str) -> Any:
    """Import a Python file by path under a private module name derived from its location."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise _error(spec, f"file not found: {path}")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"_sparselayer_reward_{stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise _error(spec, f"cannot import {path} as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        sys.modules.pop(name, None)
        raise _error(spec, f"importing {path} failed: {_describe(e)}") from None
    return module


def _import_module(spec: str, source: str) -> Any:
    """Import a module by dotted name, telling "not found" apart from "failed while importing"."""
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as e:
        if e.name and (source == e.name or source.startswith(e.name + ".")):
            raise _error(spec, f"module '{source}' not found") from None
        raise _error(spec, f"importing module '{source}' failed: {_describe(e)}") from None
    except (Exception, SystemExit) as e:
        raise _error(spec, f"importing module '{source}' failed: {_describe(e)}") from None


def _resolve(spec: str, module: Any, attribute: str) -> Callable:
    """The (possibly dotted) attribute of a module, which must be callable."""
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise _error(spec, f"'{getattr(module, '__name__', module)}' has no attribute '{attribute}'")
        target = getattr(target, part)
    if not callable(target):
        raise _error(spec, f"'{attribute}' is a {type(target).__name__}, not a function")
    return target


def load_reward_function(spec: str) -> Callable:
    """Load the user's reward function named by "module:function" or "path/to/file.py:function"."""
    source, attribute = _split_spec(spec)
    module = _import_file(spec, source) if _is_file_source(source) else _import_module(spec, source)
    return _resolve(spec, module, attribute)


def _as_reward(spec: str, value: Any, index: int) -> float:
    """One returned value as a finite float; None counts as NaN and is rejected like it."""
    if value is None:
        raise _error(spec, f"returned None at index {index} (None counts as NaN; return a number)")
    if isinstance(value, (str, bytes)):
        raise _error(spec, f"returned a non-numeric value {_first_line(repr(value))[:60]} at index {index}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _error(spec, f"returned a non-numeric {type(value).__name__} at index {index}") from None
    if not math.isfinite(number):
        raise _error(spec, f"returned a non-finite value {number} at index {index}")
    return number


def _as_rewards(spec: str, result: Any, expected: int) -> list[float]:
    """The function's result as a list of exactly `expected` finite floats."""
    if isinstance(result, (str, bytes, dict)) or not hasattr(result, "__iter__"):
        raise _error(spec, f"returned {type(result).__name__}, expected a list of {expected} numbers")
    values = list(result)
    if len(values) != expected:
        raise _error(spec, f"returned {len(values)} values for {expected} completions")
    return [_as_reward(spec, value, i) for i, value in enumerate(values)]


class RewardFunctionTask(Task):
    """A task whose rewards come from a user function; data and accuracy stay the base task's."""

    def __init__(self, base: Task, fn: Callable, spec: str) -> None:
        self.base = base
        self.fn = fn
        self.spec = spec
        self.name = base.name
        self.suggested_max_completion_length = base.suggested_max_completion_length

    @property
    def train(self) -> Sequence[Example]:
        """The base task's training prompts."""
        return self.base.train

    @property
    def test(self) -> Sequence[Example]:
        """The base task's held-out prompts."""
        return self.base.test

    def is_correct(self, completion: str, example: Example) -> bool:
        """Accuracy as the base task defines it (the user reward only shapes training)."""
        return self.base.is_correct(completion, example)

    def reward(self, completion: str, example: Example) -> float:
        """The user function's reward of a single completion."""
        return self.rewards([completion], [example])[0]

    def rewards(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        """Call the user function once for the batch and check it returned one finite number each."""
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
        if not completions:
            return []
        try:
            result = self.fn(
                prompts=[e.prompt for e in examples],
                completions=list(completions),
                answer=[e.answer for e in examples],
            )
        except Exception as e:
            raise _error(self.spec, f"raised {_describe(e)}") from None
        return _as_rewards(self.spec, result, len(completions))


def wrap_task_with_reward(task: Task, spec: str | None) -> Task:
    """The task with its reward replaced by the user function named by `spec`; unchanged if None."""
    if spec is None:
        return task
    return RewardFunctionTask(task, load_reward_function(spec), spec)
