"""User reward functions: loading by module or file path, batched calls, and one-line RewardErrors (the
single-function API of before: wrap_task_with_reward, RewardFunctionTask, load_reward_function)."""
from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from sparselayer.errors import RewardError
from sparselayer.tasks.base import Example, Task
from sparselayer.tasks.user_reward import RewardFunctionTask, load_reward_function, wrap_task_with_reward


class TinyTask(Task):
    """Two prompts whose answer is the prompt's length as text."""

    name = "tiny"

    @property
    def train(self) -> Sequence[Example]:
        return [Example("ab", "2"), Example("abc", "3")]

    @property
    def test(self) -> Sequence[Example]:
        return [Example("abcd", "4")]

    def is_correct(self, completion: str, example: Example) -> bool:
        return completion.strip() == example.answer


REWARDS = '''
calls = []

def length_reward(prompts, completions, answer, **kwargs):
    calls.append((list(prompts), list(completions), list(answer)))
    return [float(c.strip() == a) + 0.1 * len(p) for p, c, a in zip(prompts, completions, answer)]

def raises(prompts, completions, answer):
    raise ValueError("bad completion\\nsecond line of detail")

def too_few(prompts, completions, answer):
    return [1.0]

def gives_none(prompts, completions, answer):
    return [1.0, None]

def gives_text(prompts, completions, answer):
    return [1.0, "high"]

def gives_nan(prompts, completions, answer):
    return [1.0, float("nan")]

def gives_inf(prompts, completions, answer):
    return [float("inf"), 1.0]

def gives_scalar(prompts, completions, answer):
    return 1.0

def gives_ints_and_tuple(prompts, completions, answer):
    return (1, 0)

not_a_function = 42
'''


@pytest.fixture
def reward_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent(REWARDS))
    return path


@pytest.fixture
def reward_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    package = tmp_path / "pkg_rewards_for_test"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scoring.py").write_text(textwrap.dedent(REWARDS))
    (package / "broken.py").write_text("import numpy_that_does_not_exist_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "pkg_rewards_for_test"
    for name in [m for m in sys.modules if m.startswith("pkg_rewards_for_test")]:
        del sys.modules[name]


def reward_error(call, *args) -> str:
    """The message of the RewardError raised by call(*args), checked to be one line."""
    with pytest.raises(RewardError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_file_spec_calls_function_once_per_batch(reward_file: Path) -> None:
    spec = f"{reward_file}:length_reward"
    task = wrap_task_with_reward(TinyTask(), spec)
    examples = list(task.train)

    assert isinstance(task, RewardFunctionTask)
    assert task.rewards(["2", "wrong"], examples) == pytest.approx([1.2, 0.3])
    calls = sys.modules[task.fn.__module__].calls
    assert calls == [(["ab", "abc"], ["2", "wrong"], ["2", "3"])]
    assert task.reward("3", examples[1]) == pytest.approx(1.3)
    assert task.rewards([], []) == []


def test_wrapped_task_keeps_base_data_and_accuracy(reward_file: Path) -> None:
    base = TinyTask()
    task = wrap_task_with_reward(base, f"{reward_file}:length_reward")
    assert task.name == base.name
    assert list(task.train) == list(base.train) and list(task.test) == list(base.test)
    assert task.is_correct("4", base.test[0]) and not task.is_correct("5", base.test[0])


def test_no_spec_returns_task_unchanged() -> None:
    base = TinyTask()
    assert wrap_task_with_reward(base, None) is base


def test_module_spec_loads_dotted_module(reward_module: str) -> None:
    fn = load_reward_function(f"{reward_module}.scoring:length_reward")
    assert fn(prompts=["a"], completions=["1"], answer=["1"]) == pytest.approx([1.1])


def test_tuple_of_ints_is_accepted(reward_file: Path) -> None:
    task = wrap_task_with_reward(TinyTask(), f"{reward_file}:gives_ints_and_tuple")
    assert task.rewards(["x", "y"], list(task.train)) == [1.0, 0.0]


@pytest.mark.parametrize("spec", ["no_colon_here", "module:", ":function", "mod:not-an-identifier", ""])
def test_bad_spec_syntax(spec: str) -> None:
    assert "expected 'module:function'" in reward_error(load_reward_function, spec)


def test_missing_file(tmp_path: Path) -> None:
    spec = f"{tmp_path / 'absent.py'}:reward"
    message = reward_error(load_reward_function, spec)
    assert "file not found" in message and "absent.py" in message


def test_missing_module() -> None:
    message = reward_error(load_reward_function, "no_such_module_xyz_123:reward")
    assert "module 'no_such_module_xyz_123' not found" in message


def test_module_whose_import_fails(reward_module: str) -> None:
    message = reward_error(load_reward_function, f"{reward_module}.broken:reward")
    assert "importing module" in message and "numpy_that_does_not_exist_xyz" in message


def test_file_whose_import_fails(tmp_path: Path) -> None:
    path = tmp_path / "crashes.py"
    path.write_text("raise RuntimeError('cannot start\\nmore')\n")
    message = reward_error(load_reward_function, f"{path}:reward")
    assert "RuntimeError: cannot start" in message and "more" not in message


def test_missing_attribute(reward_file: Path) -> None:
    message = reward_error(load_reward_function, f"{reward_file}:nope")
    assert "has no attribute 'nope'" in message and "my_rewards.py" in message


def test_attribute_not_callable(reward_file: Path) -> None:
    assert "not a function" in reward_error(load_reward_function, f"{reward_file}:not_a_function")


@pytest.mark.parametrize(
    "function, fragment",
    [
        ("raises", "raised ValueError: bad completion"),
        ("too_few", "returned 1 values for 2 completions"),
        ("gives_text", "non-numeric value 'high' at index 1"),
        ("gives_nan", "non-finite value nan at index 1"),
        ("gives_inf", "non-finite value inf at index 0"),
        ("gives_scalar", "returned float, expected a list of 2 numbers"),
    ],
)
def test_bad_function_behaviour(reward_file: Path, function: str, fragment: str) -> None:
    spec = f"{reward_file}:{function}"
    task = wrap_task_with_reward(TinyTask(), spec)
    message = reward_error(task.rewards, ["2", "3"], list(task.train))
    assert fragment in message
    assert spec in message


def test_none_means_not_applicable_and_counts_as_zero_alone(reward_file: Path, capsys) -> None:
    """TRL's convention: None is "not applicable"; with one function, such a completion's reward is 0 (nansum)."""
    task = wrap_task_with_reward(TinyTask(), f"{reward_file}:gives_none")
    assert task.rewards(["2", "3"], list(task.train)) == [1.0, 0.0]
    assert "returned None for 1 of 2 completions" in capsys.readouterr().err


def test_function_gets_completion_ids_and_columns(tmp_path: Path) -> None:
    path = tmp_path / "seen.py"
    path.write_text("seen = {}\ndef record(prompts, completions, **kwargs):\n    seen.update(kwargs)\n"
                    "    return [0.0] * len(completions)\n")
    task = wrap_task_with_reward(TinyTask(), f"{path}:record")
    examples = [Example("ab", "2", {"level": 1}), Example("abc", None, {"level": 2, "tag": "x"})]
    task.rewards(["2", "3"], examples)
    seen = sys.modules[task.fn.__module__].seen
    assert seen == {"completion_ids": [None, None], "level": [1, 2], "tag": [None, "x"], "answer": ["2", None]}


@pytest.mark.parametrize("body, fragment", [("import sys; sys.exit(0)", "exited (SystemExit(0)"),
                                            ("raise SystemExit", "exited (SystemExit,")])
def test_exit_in_reward_function_is_a_reward_error(tmp_path: Path, body: str, fragment: str) -> None:
    path = tmp_path / "quits.py"
    path.write_text(f"def quit_early(prompts, completions, **kwargs):\n    {body}\n")
    task = wrap_task_with_reward(TinyTask(), f"{path}:quit_early")
    message = reward_error(task.rewards, ["2", "3"], list(task.train))
    assert fragment in message and "quits.py:quit_early" in message
