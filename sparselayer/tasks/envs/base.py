"""The environment interface of multi-turn tasks: `reset(seed)` gives the first observation, `step(action)`
the next observation, the step's reward and whether the episode is over.

Observations and actions are text: the model reads a prompt built from the observation (and a bounded
history of earlier observations and actions, `Environment.prompt`) and its completion is the action. An
environment is a plain Python class with a no-argument constructor, named on the command line by
`--env module:Class` or `--env path/to/file.py:Class`; one instance plays one episode at a time.

Held-out episodes: seeds from HELD_OUT_SEED up are evaluation episodes, seeds below it training ones; an
environment whose episodes could repeat across the two ranges keeps them apart with `is_held_out_seed`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import ConfigError, RewardError
from ..base import Prompt

HELD_OUT_SEED = 1 << 30  # seeds from here up are held-out episodes, never trained on


def is_held_out_seed(seed: int) -> bool:
    """Whether `seed` names a held-out (evaluation) episode."""
    return seed >= HELD_OUT_SEED


@dataclass(frozen=True)
class StepResult:
    """What one action did: the next observation ("" once done), its reward, whether the episode ended, and,
    at the end, whether it succeeded (None: the episode succeeded when its return is positive)."""

    observation: str
    reward: float
    done: bool
    success: bool | None = None


class Environment(ABC):
    """One episode at a time: `reset(seed)`, then `step(action)` until a result says done. Subclassing is
    optional: any class with these two methods serves (its `step` may return an (observation, reward, done)
    tuple, and without `prompt` its turns use `text_prompt`)."""

    instruction: str = ""  # text put before every prompt (the task's description, if the model needs one)
    suggested_max_completion_length: int = 256  # tokens per action when --max-completion-length is not given

    @abstractmethod
    def reset(self, seed: int) -> str:
        """Start the episode `seed` (the same seed gives the same episode); return its first observation."""

    @abstractmethod
    def step(self, action: str) -> StepResult:
        """Apply the model's action (its decoded completion) to the current state."""

    def prompt(self, history: Sequence[tuple[str, str]], observation: str) -> Prompt:
        """The prompt of one turn (`text_prompt`); override to build a conversation instead."""
        return text_prompt(self.instruction, history, observation)


def text_prompt(instruction: str, history: Sequence[tuple[str, str]], observation: str) -> str:
    """The instruction, then each (observation, action) pair of the bounded history on its own line, then the
    current observation: `123+456=0579\n579+111=`."""
    past = "".join(f"{seen}{action}\n" for seen, action in history)
    return f"{instruction}{past}{observation}"


def turn_prompt(env: Any, history: Sequence[tuple[str, str]], observation: str) -> Prompt:
    """The prompt of one turn of `env`: its own `prompt`, or (a plain class without one) `text_prompt` with its
    `instruction` attribute, if any."""
    if callable(getattr(env, "prompt", None)):
        return env.prompt(history, observation)
    return text_prompt(getattr(env, "instruction", ""), history, observation)


def step_result(value: Any) -> StepResult:
    """What `step` returned as a StepResult: one already, or an (observation, reward, done) tuple."""
    if isinstance(value, StepResult):
        return value
    try:
        observation, reward, done = value
        return StepResult(str(observation), float(reward), bool(done))
    except (TypeError, ValueError):
        raise ConfigError(f"an environment's step returned {type(value).__name__}: it must return a StepResult "
                          "or an (observation, reward, done) tuple") from None


EnvFactory = Callable[[], Any]  # makes a fresh environment: an Environment, or any class with reset and step


def load_environment(spec: str) -> EnvFactory:
    """The environment class named by "module:Class" or "path/to/file.py:Class" (imported: this runs that
    code); a spec that cannot be loaded, or names no Environment-like class, is one ConfigError line."""
    from ..user_reward import _import_file, _import_module, _resolve, _split_spec

    try:
        source, attribute = _split_spec(spec)
        module = _import_file(spec, source) if source.endswith(".py") or "/" in source else _import_module(spec, source)
        target = _resolve(spec, module, attribute)
    except RewardError as e:  # the shared loader names a reward function: say environment instead
        detail = str(e).split("': ", 1)[-1]
        raise ConfigError(f"--env '{spec}': {detail}") from None
    if not isinstance(target, type) or not all(callable(getattr(target, m, None)) for m in ("reset", "step")):
        raise ConfigError(f"--env '{spec}': {attribute} is not an environment class (it needs reset(seed) and "
                          "step(action) methods)")
    return target
