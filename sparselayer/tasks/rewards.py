"""Several reward functions in TRL's convention, each named, weighted and summed into one reward.

A reward function is called once per batch of completions, as TRL's GRPOTrainer calls one:

    fn(prompts=[...], completions=[...], completion_ids=[...], **columns) -> one float or None each

`prompts` are the examples' prompts (text, or a conversation: a list of {role, content} messages),
`completions` the decoded completions (for a conversation prompt TRL's form, a one-message list
[{"role": "assistant", "content": text}]), `completion_ids` their token ids (EOS kept), and every
other column of the data rows (`Example.columns`, plus `answer` where the rows have one) is a
keyword holding one value per completion; a function without **kwargs gets only the keywords it
names. None means "not applicable" (TRL turns it into NaN): the weighted sum skips it (TRL's
nansum), so a completion every function returns None for gets 0.0, with one warning on stderr.
The built-ins are `accuracy`, `format` and `code_tests` (code_reward.py); a task's own reward
(no --reward) runs as the function named `task`.

User code that raises, exits (sys.exit, SystemExit) or returns something else than one finite
number or None per completion is a one-line RewardError naming the function; KeyboardInterrupt
passes through, so Ctrl-C still stops a run.
"""
from __future__ import annotations

import inspect
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import TaskConfig
from ..errors import ConfigError, RewardError, first_line
from .base import Example, Task, completion_text

DEFAULT_FORMAT_PATTERN: str = TaskConfig.format_pattern  # <think>...</think>, then a non-empty answer
BUILTIN_REWARDS = ("accuracy", "format", "code_tests")
RESERVED_ARGUMENTS = ("prompts", "completions", "completion_ids")  # no data column may take these names
TASK_REWARD_NAME = "task"  # the metrics name of a task's own reward (no --reward)


# -- one-line errors -------------------------------------------------------------------------------



def describe(exc: BaseException) -> str:
    """An exception as "Type: first line of its message" (just the type when it has no message)."""
    message = first_line(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def reward_error(source: str, detail: str) -> RewardError:
    """A one-line RewardError naming the reward function (its spec, built-in name or Python name)."""
    return RewardError(f"reward function '{first_line(source)}': {detail}")


def _failure(exc: BaseException) -> str:
    """What user code did instead of returning rewards: exited (SystemExit) or raised."""
    if isinstance(exc, SystemExit):
        how = "SystemExit" if exc.code is None else f"SystemExit({exc.code!r})"
        return f"exited ({how}, e.g. sys.exit) instead of returning one number or None per completion"
    return f"raised {describe(exc)}"


# -- the batch as reward functions see it ----------------------------------------------------------


def is_conversation(prompt: Any) -> bool:
    """Whether a prompt is a conversation (a list of {role, content} messages) rather than text."""
    return not isinstance(prompt, str) and isinstance(prompt, Sequence) and all(
        isinstance(m, Mapping) and "role" in m for m in prompt)


@dataclass(frozen=True)
class RewardBatch:
    """The completions of one rollout batch and their examples: row i is completion i of examples[i]."""

    examples: Sequence[Example]
    texts: Sequence[str]  # decoded completions
    completion_ids: Sequence[Sequence[int] | None]  # None where the caller has no token ids (Task.rewards)

    def __post_init__(self) -> None:
        if not len(self.examples) == len(self.texts) == len(self.completion_ids):
            raise ValueError(f"{len(self.texts)} completions, {len(self.completion_ids)} id lists and "
                             f"{len(self.examples)} examples")

    @classmethod
    def of(cls, texts: Sequence[str], examples: Sequence[Example],
           completion_ids: Sequence[Sequence[int]] | None = None) -> RewardBatch:
        """A batch from completions and their examples (token ids None when not given)."""
        ids = list(completion_ids) if completion_ids is not None else [None] * len(texts)
        return cls(list(examples), list(texts), ids)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def prompts(self) -> list[Any]:
        """Each row's prompt, text or conversation, as the dataset holds it."""
        return [e.prompt for e in self.examples]

    @property
    def completions(self) -> list[Any]:
        """Each completion in TRL's form: text, or [{"role": "assistant", "content": text}] for a conversation."""
        return [[{"role": "assistant", "content": t}] if is_conversation(e.prompt) else t
                for t, e in zip(self.texts, self.examples)]

    def columns(self) -> dict[str, list[Any]]:
        """Every data column as one value per completion: the rows' columns (None where a row lacks one), and
        `answer` (the example's answer, else its `answer` column) when any row has one."""
        names = list(dict.fromkeys(name for e in self.examples for name in e.columns))
        clash = next((name for name in names if name in RESERVED_ARGUMENTS), None)
        if clash:
            raise RewardError(f"data column '{clash}' has the name of a reward-function argument "
                              f"({', '.join(RESERVED_ARGUMENTS)}): rename the column")
        values = {name: [e.columns.get(name) for e in self.examples] for name in names}
        if "answer" in values or any(e.answer is not None for e in self.examples):
            values["answer"] = [e.answer if e.answer is not None else e.columns.get("answer") for e in self.examples]
        return values

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments of a call in TRL's convention."""
        return {"prompts": self.prompts, "completions": self.completions,
                "completion_ids": [None if ids is None else list(ids) for ids in self.completion_ids],
                **self.columns()}


# -- checking what a function returned -------------------------------------------------------------


def _as_reward(source: str, value: Any, index: int) -> float | None:
    """One returned value as a finite float, or None (not applicable)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        raise reward_error(source, f"returned a non-numeric value {first_line(repr(value))[:60]} at index {index}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise reward_error(source, f"returned a non-numeric {type(value).__name__} at index {index}") from None
    if not math.isfinite(number):
        raise reward_error(source, f"returned a non-finite value {number} at index {index} "
                                   "(return None where the reward does not apply)")
    return number


def as_rewards(source: str, result: Any, expected: int) -> list[float | None]:
    """A function's result as exactly `expected` values, each a finite float or None."""
    if isinstance(result, (str, bytes, dict)) or not hasattr(result, "__iter__"):
        raise reward_error(source, f"returned {type(result).__name__}, expected a list of {expected} numbers")
    values = list(result)
    if len(values) != expected:
        raise reward_error(source, f"returned {len(values)} values for {expected} completions")
    return [_as_reward(source, value, i) for i, value in enumerate(values)]


def accepted_arguments(fn: Callable[..., Any], arguments: dict[str, Any]) -> dict[str, Any]:
    """The keywords `fn` can take: all of them when it has **kwargs (TRL's functions do), else only those it
    names, so that a function written as fn(prompts, completions, answer) keeps working beside new columns."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): pass everything
        return arguments
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return arguments
    names = {p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                       inspect.Parameter.KEYWORD_ONLY)}
    return {k: v for k, v in arguments.items() if k in names}


# -- one function ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardFunction:
    """A named reward function: `name` keys its metrics (rewards/<name>/mean), `source` names it in errors.

    `fn` is called in TRL's convention, or, with `on_examples`, as fn(texts, examples) with the batch's
    own Example objects (how a task's own reward and accuracy run). `user`: the code is the user's, so
    an exception or exit becomes a one-line RewardError instead of a traceback.
    """

    name: str
    fn: Callable[..., Any]
    source: str = ""
    user: bool = True
    on_examples: bool = False

    @classmethod
    def of(cls, fn: Callable[..., Any], source: str | None = None) -> RewardFunction:
        """A user callable in TRL's convention, named by its __name__ as TRL names it."""
        if not callable(fn):
            raise RewardError(f"reward function {first_line(repr(fn))[:60]}: a {type(fn).__name__} is not callable")
        name = getattr(fn, "__name__", None) or type(fn).__name__
        return cls(name, fn, source or name)

    def __call__(self, batch: RewardBatch) -> list[float | None]:
        """This function's value for every completion of the batch (None: not applicable)."""
        if not len(batch):
            return []
        try:
            result = (self.fn(list(batch.texts), list(batch.examples)) if self.on_examples
                      else self.fn(**accepted_arguments(self.fn, batch.arguments())))
        except RewardError:
            raise
        except (Exception, SystemExit) as exc:
            if not self.user:
                raise
            raise reward_error(self.source or self.name, _failure(exc)) from None
        return as_rewards(self.source or self.name, result, len(batch))


# -- the built-ins ---------------------------------------------------------------------------------


def format_reward(pattern: str = DEFAULT_FORMAT_PATTERN) -> RewardFunction:
    """`format`: 1.0 where the whole completion text matches `pattern` (re.fullmatch), else 0.0."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"--format-pattern is not a valid regular expression: {exc}") from None

    def matches_format(completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return [1.0 if compiled.fullmatch(completion_text(c)) else 0.0 for c in completions]

    return RewardFunction("format", matches_format, "format", user=False)


def accuracy_reward(task: Task | None = None) -> RewardFunction:
    """`accuracy`: 1.0 where the task judges the completion correct (a data file: math answer checking
    against `answer` with math-verify), else 0.0; None for an example without an answer."""
    from .math_answers import answers_match

    def accuracy(texts: Sequence[str], examples: Sequence[Example]) -> list[float | None]:
        def correct(text: str, example: Example) -> bool:
            return task.is_correct(text, example) if task is not None else answers_match(text, example.answer)

        return [None if e.answer is None else float(correct(t, e)) for t, e in zip(texts, examples)]

    return RewardFunction("accuracy", accuracy, "accuracy", user=False, on_examples=True)


def task_reward(task: Task) -> RewardFunction:
    """`task`: the task's own rewards (Task.rewards), what trains when no reward function is given."""
    return RewardFunction(TASK_REWARD_NAME, task.rewards, TASK_REWARD_NAME, user=False, on_examples=True)


def builtin_reward(name: str, task: Task | None = None, format_pattern: str = DEFAULT_FORMAT_PATTERN
                   ) -> RewardFunction:
    """The built-in reward called `name` (accuracy, format, code_tests)."""
    if name == "accuracy":
        return accuracy_reward(task)
    if name == "format":
        return format_reward(format_pattern)
    if name == "code_tests":  # the row's tests run on the completion's code in a sandbox (code_reward.py)
        from .code_reward import code_tests_reward

        return RewardFunction("code_tests", code_tests_reward(), "code_tests", user=False)
    raise ConfigError(f"unknown built-in reward {name!r}: built-ins are {', '.join(BUILTIN_REWARDS)}")


# -- several functions, weighted -------------------------------------------------------------------


@dataclass(frozen=True)
class RewardScores:
    """Per-function values (None: not applicable) by metrics name, and each completion's weighted total."""

    per_function: dict[str, list[float | None]]
    total: list[float]


def unique_names(names: Sequence[str]) -> list[str]:
    """Names made unique for metrics keys: a repeated name gets _2, _3, ... in order."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


class RewardSet:
    """Reward functions and their weights: each is called once per batch, and a completion's reward is
    the weighted sum of the values that are not None (TRL's nansum; all None: 0.0, with a warning)."""

    def __init__(self, functions: Sequence[RewardFunction], weights: Sequence[float] | None = None) -> None:
        if not functions:
            raise ConfigError("a reward set needs at least one reward function")
        weights = [1.0] * len(functions) if weights is None else [float(w) for w in weights]
        if len(weights) != len(functions):
            raise ConfigError(f"--reward-weights has {len(weights)} weights for {len(functions)} reward functions: "
                              "give one weight per --reward")
        if not all(math.isfinite(w) for w in weights):
            raise ConfigError(f"--reward-weights must be finite numbers, got {weights}")
        self.functions = list(functions)
        self.weights = weights
        self.names = unique_names([f.name for f in functions])
        self.warned = False

    def score(self, batch: RewardBatch) -> RewardScores:
        """Every function's values for the batch and the weighted total of each completion."""
        per_function = {name: fn(batch) for name, fn in zip(self.names, self.functions)}
        columns = list(per_function.values())
        total = [sum(w * v[i] for w, v in zip(self.weights, columns) if v[i] is not None) for i in range(len(batch))]
        unscored = sum(all(v[i] is None for v in columns) for i in range(len(batch)))
        if unscored:
            self._warn(unscored, len(batch))
        return RewardScores(per_function, [float(t) for t in total])

    def _warn(self, unscored: int, n: int) -> None:
        """One line on stderr, the first time every function returns None for some completion (TRL warns too)."""
        if not self.warned:
            self.warned = True
            print(f"sparselayer: warning: every reward function returned None for {unscored} of {n} completions; "
                  "they get a reward of 0 (further cases are not reported)", file=sys.stderr)


def reward_set_of(task: Task) -> RewardSet:
    """The reward functions that score `task`'s completions: its own set, else its own reward as `task`."""
    rewards = getattr(task, "reward_set", None)
    return rewards if isinstance(rewards, RewardSet) else RewardSet([task_reward(task)])


# -- a task scored by a reward set -----------------------------------------------------------------


class RewardedTask(Task):
    """A task whose rewards come from a RewardSet; data, accuracy and everything else stay the base task's."""

    def __init__(self, base: Task, reward_set: RewardSet) -> None:
        self.base = base
        self.reward_set = reward_set
        self.name = base.name
        self.suggested_max_completion_length = base.suggested_max_completion_length

    def __getattr__(self, name: str) -> Any:
        """Anything else a task offers (settings, helpers) is the base task's."""
        if name == "base":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    @property
    def train(self) -> Sequence[Example]:
        """The base task's training prompts."""
        return self.base.train

    @property
    def test(self) -> Sequence[Example]:
        """The base task's held-out prompts."""
        return self.base.test

    def is_correct(self, completion: str, example: Example) -> bool:
        """Accuracy as the base task defines it (the reward functions only shape training)."""
        return self.base.is_correct(completion, example)

    def reward(self, completion: str, example: Example) -> float:
        """The weighted reward of a single completion."""
        return self.rewards([completion], [example])[0]

    def rewards(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        """Weighted rewards of a batch (no token ids here: completion_ids holds None for each)."""
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
        return self.reward_set.score(RewardBatch.of(completions, examples)).total
