"""Several reward functions in TRL's convention: data columns as keywords, weights, None, the built-ins,
per-function metrics checked by hand against the completions of real training steps, and reward code that
exits (one error line through the CLI, non-zero status)."""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest
from helpers import DigitShareTask

from sparselayer.cli import main
from sparselayer.config import TrainConfig
from sparselayer.errors import ConfigError, RewardError
from sparselayer.metrics import reward_function_metrics
from sparselayer.tasks import ArithmeticTask, RewardBatch, RewardedTask, RewardFunction, RewardSet, build_task
from sparselayer.tasks.base import Example, Task
from sparselayer.tasks.dataset import DatasetTask
from sparselayer.tasks.math_answers import answers_match
from sparselayer.tasks.rewards import DEFAULT_FORMAT_PATTERN, accuracy_reward, format_reward
from sparselayer.tasks.user_reward import resolve_reward, with_rewards
from sparselayer.train import train
from sparselayer.trainer import Trainer

DIFFICULTY = [0, 1, 2, 3]  # difficulty 0: the column-reading reward does not apply (None)
DIGITS = r"(?s).*\d.*"  # a --format-pattern random tiny models sometimes match


class ColumnTask(Task):
    """Four addition prompts whose rows carry an extra `difficulty` column."""

    name = "columns"
    suggested_max_completion_length = 8

    def __init__(self) -> None:
        pairs = [(7, 123), (40, 2), (315, 6), (99, 1)]
        self._train = [Example(f"{a:03d}+{b:03d}=", str(a + b), {"difficulty": d})
                       for (a, b), d in zip(pairs, DIFFICULTY)]

    @property
    def train(self) -> Sequence[Example]:
        return self._train

    @property
    def test(self) -> Sequence[Example]:
        return [Example("001+001=", "2", {"difficulty": 1})]

    def is_correct(self, completion: str, example: Example) -> bool:
        return completion.strip() == example.answer


def by_difficulty(prompts, completions, completion_ids, difficulty, **kwargs):
    """Reads the `difficulty` column and the token ids; not applicable (None) at difficulty 0."""
    return [None if d == 0 else d * len(ids) / 10 for ids, d in zip(completion_ids, difficulty)]


def digit_share(completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


SHAPING = '''
def by_difficulty(prompts, completions, completion_ids, difficulty, **kwargs):
    return [None if d == 0 else d * len(ids) / 10 for ids, d in zip(completion_ids, difficulty)]

def level(completions, difficulty, **kwargs):
    return [None if d == 0 else float(d) for d in difficulty]
'''


@pytest.fixture
def shaping_file(tmp_path: Path) -> Path:
    path = tmp_path / "shaping.py"
    path.write_text(textwrap.dedent(SHAPING))
    return path


def _examples(texts: Sequence[str], **columns) -> list[Example]:
    return [Example(f"p{i}", None, {k: v[i] for k, v in columns.items()}) for i in range(len(texts))]


# ----------------------------------------------------------------------------- the convention


def test_each_column_is_a_keyword_with_one_value_per_completion():
    seen = {}

    def record(prompts, completions, completion_ids, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        return [0.0] * len(completions)

    examples = [Example("a", "1", {"difficulty": 2}), Example("b", None, {"difficulty": 5, "topic": "x"})]
    RewardSet([RewardFunction.of(record)]).score(RewardBatch(examples, ["c1", "c2"], [[4, 5], [6]]))
    assert seen == {"prompts": ["a", "b"], "completions": ["c1", "c2"], "completion_ids": [[4, 5], [6]],
                    "difficulty": [2, 5], "topic": [None, "x"], "answer": ["1", None]}


def test_no_answer_keyword_when_no_row_has_one():
    batch = RewardBatch.of(["x"], [Example("p", None, {"k": 1})])
    assert set(batch.arguments()) == {"prompts", "completions", "completion_ids", "k"}


def test_conversation_prompts_get_completions_as_assistant_messages():
    conversation = [{"role": "user", "content": "2+2?"}]
    batch = RewardBatch.of(["<think>hm</think> 4", "4"], [Example(conversation, "4"), Example("2+2=", "4")])
    assert batch.completions == [[{"role": "assistant", "content": "<think>hm</think> 4"}], "4"]
    assert batch.prompts == [conversation, "2+2="]
    assert format_reward()(batch) == [1.0, 0.0]


def test_function_without_kwargs_gets_only_the_keywords_it_names():
    def old_style(prompts, completions, answer):
        return [float(c == a) for c, a in zip(completions, answer)]

    batch = RewardBatch.of(["1", "3"], [Example("p", "1", {"extra": 1}), Example("q", "2", {"extra": 2})])
    assert RewardFunction.of(old_style)(batch) == [1.0, 0.0]


def test_column_named_like_an_argument_is_one_error_line():
    batch = RewardBatch.of(["x"], [Example("p", "1", {"completions": "mine"})])
    with pytest.raises(RewardError, match="data column 'completions' has the name of a reward-function argument"):
        RewardFunction.of(digit_share)(batch)


# ----------------------------------------------------------------------------- weights and None


def test_weighted_sum_skips_none_and_all_none_is_zero_with_one_warning(capsys):
    first = RewardFunction("first", lambda completions, **kw: [1.0, None, None, 4.0])
    second = RewardFunction("second", lambda completions, **kw: [10.0, 20.0, None, None])
    rewards = RewardSet([first, second], [0.5, 2.0])
    batch = RewardBatch.of(["a", "b", "c", "d"], _examples("abcd"))
    scores = rewards.score(batch)
    assert scores.per_function == {"first": [1.0, None, None, 4.0], "second": [10.0, 20.0, None, None]}
    assert scores.total == [0.5 + 20.0, 40.0, 0.0, 2.0]  # TRL: nansum over functions
    rewards.score(batch)
    err = capsys.readouterr().err.splitlines()
    assert err == ["sparselayer: warning: every reward function returned None for 1 of 4 completions; they get a "
                   "reward of 0 (further cases are not reported)"]


def test_metrics_mean_and_std_over_the_completions_a_function_applied_to():
    metrics = reward_function_metrics({"f": [1.0, None, 3.0, 5.0], "one": [None, 2.0], "none": [None, None]})
    assert metrics["rewards/f/mean"] == 3.0 and metrics["rewards/f/std"] == pytest.approx(2.0)  # sample std
    assert metrics["rewards/one/mean"] == 2.0 and math.isnan(metrics["rewards/one/std"])
    assert math.isnan(metrics["rewards/none/mean"]) and math.isnan(metrics["rewards/none/std"])


def test_repeated_names_get_a_suffix_and_weights_are_checked():
    rewards = RewardSet([format_reward(), format_reward(r"\d+"), RewardFunction.of(digit_share)])
    assert rewards.names == ["format", "format_2", "digit_share"] and rewards.weights == [1.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match="2 weights for 3 reward functions"):
        RewardSet(rewards.functions, [1.0, 2.0])


def test_non_finite_value_is_an_error_pointing_at_none():
    nan = RewardFunction("nan", lambda completions, **kw: [math.nan])
    with pytest.raises(RewardError, match="non-finite value nan at index 0 .return None where"):
        nan(RewardBatch.of(["x"], _examples("x")))


# ----------------------------------------------------------------------------- built-ins


def test_format_is_a_full_match_of_the_pattern():
    texts = ["<think>a b</think> 42", "  <think>\nx\n</think>\n\\boxed{7} done", "42", "<think>x</think>  ",
             "so <think>x</think> 42", "<think>x</think> 42\n"]
    assert format_reward()(RewardBatch.of(texts, _examples(texts))) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert format_reward(r"\d+")(RewardBatch.of(["12", "12a"], _examples("ab"))) == [1.0, 0.0]
    assert DEFAULT_FORMAT_PATTERN == TrainConfig().task.format_pattern


def test_accuracy_checks_math_answers_and_is_none_without_an_answer():
    task = DatasetTask("d", [Example("q", "#### 1,234")], [])
    examples = [Example("q", "#### 1,234"), Example("q", "\\boxed{\\frac{1}{2}}"), Example("q", "5"),
                Example("q", None)]
    texts = ["so the total is 1234.", "we get \\boxed{0.5}", "it is 6", "anything"]
    assert accuracy_reward(task)(RewardBatch.of(texts, examples)) == [1.0, 1.0, 0.0, None]
    assert accuracy_reward()(RewardBatch.of(texts, examples)) == [1.0, 1.0, 0.0, None]  # no task: math-verify


def test_accuracy_of_a_built_in_task_is_its_own_is_correct():
    task = ArithmeticTask()
    example = task.train[0]
    texts = [example.answer, "0" + example.answer, f"{example.answer} apples"]
    assert accuracy_reward(task)(RewardBatch.of(texts, [example] * 3)) == [1.0, 1.0, 0.0]


def test_unknown_reward_name_and_bad_items_are_one_line():
    with pytest.raises(RewardError,
                       match=r"'acuracy': not a built-in reward \(accuracy, format, code_tests\); expected"):
        resolve_reward("acuracy")
    with pytest.raises(ConfigError, match="got int"):
        resolve_reward(3)


# ----------------------------------------------------------------------------- Python API


def test_build_task_mixes_names_specs_and_callables(shaping_file):
    task = build_task(reward=["format", f"{shaping_file}:level", digit_share], reward_weights=[1.0, 2.0, 3.0],
                      format_pattern=r"\d+")
    assert isinstance(task, RewardedTask) and isinstance(task.base, ArithmeticTask)
    assert task.reward_set.names == ["format", "level", "digit_share"]
    examples = [Example("p", "1", {"difficulty": 0}), Example("q", "2", {"difficulty": 2})]
    # format [1, 0]; level [None, 2]; digit_share [1, 0.5]
    assert task.rewards(["12", "1a"], examples) == pytest.approx([1.0 + 3.0, 0.0 + 4.0 + 1.5])
    assert task.is_correct(task.train[0].answer, task.train[0])


def test_weights_alone_weight_the_task_reward_and_nothing_leaves_the_task_unchanged():
    base = DigitShareTask()
    assert with_rewards(base) is base and type(build_task()) is ArithmeticTask
    weighted = with_rewards(base, weights=[3.0])
    assert weighted.reward_set.names == ["task"]
    assert weighted.rewards(["12ab"], [base.train[0]]) == [1.5]
    with pytest.raises(ConfigError, match="either with the task or in the settings"):
        with_rewards(weighted, ["format"])


def test_keyboard_interrupt_in_a_reward_function_passes_through():
    def interrupted(completions, **kwargs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        RewardFunction.of(interrupted)(RewardBatch.of(["x"], _examples("x")))


# ----------------------------------------------------------------------------- training, checked by hand


def _config(model, out: Path, **extra) -> TrainConfig:
    base = {"model": str(model), "layers": "2", "max_steps": 2, "prompts_per_step": 4, "num_generations": 4,
            "micro_batch_size": 8, "learning_rate": 0.01, "max_completion_length": 8, "output_dir": str(out),
            "progress": False, "eval_at_start": False, "eval_at_end": False, "save_steps": 10, "seed": 3}
    return TrainConfig.from_mapping({**base, **extra})


@pytest.fixture
def scored(monkeypatch) -> list[tuple[list[str], list[list[int]], list[Example]]]:
    """Every score stage's (decoded completions, completion ids, example per completion), in step order."""
    calls = []
    original = Trainer.score

    def recording(self, rollouts, examples):
        n = self.config.rl.num_generations
        texts = self.tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        calls.append((texts, [list(ids) for ids in rollouts.completion_ids], [e for e in examples for _ in range(n)]))
        return original(self, rollouts, examples)

    monkeypatch.setattr(Trainer, "score", recording)
    return calls


def _stats(values: list[float | None]) -> tuple[float, float]:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept), statistics.stdev(kept)


def _check_line(line: dict, expected: dict[str, list[float | None]], weights: dict[str, float]) -> None:
    """The per-function means/stds and the weighted sum's mean/std of one metrics line, against values by hand."""
    for name, values in expected.items():
        mean, std = _stats(values)
        assert line[f"rewards/{name}/mean"] == pytest.approx(mean, rel=1e-6, abs=1e-9), name
        assert line[f"rewards/{name}/std"] == pytest.approx(std, rel=1e-5, abs=1e-7), name
    rows = range(len(next(iter(expected.values()))))
    total = [sum(weights[k] * v[i] for k, v in expected.items() if v[i] is not None) for i in rows]
    assert line["reward_mean"] == pytest.approx(statistics.fmean(total), rel=1e-5, abs=1e-6)
    assert line["reward_std"] == pytest.approx(statistics.stdev(total), rel=1e-4, abs=1e-6)


def test_metrics_jsonl_per_function_means_equal_a_hand_computation(tiny_model, tmp_path, shaping_file, scored):
    """--reward file.py:by_difficulty (reads the difficulty column) --reward format, weights 0.5 and 2, on a task
    passed in Python whose rows carry that column: metrics.jsonl against the logged completions."""
    out = tmp_path / "run"
    weights = {"by_difficulty": 0.5, "format": 2.0}
    config = _config(tiny_model, out, reward=[f"{shaping_file}:by_difficulty", "format"],
                     reward_weights=list(weights.values()), format_pattern=DIGITS)
    train(config, task=ColumnTask())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == len(scored) == 2
    for line, (texts, ids, examples) in zip(lines, scored):
        difficulty = [e.columns["difficulty"] for e in examples]
        assert sorted(set(difficulty)) == DIFFICULTY  # every prompt in every step: None rows included
        expected = {"by_difficulty": [None if d == 0 else d * len(i) / 10 for i, d in zip(ids, difficulty)],
                    "format": [1.0 if re.fullmatch(DIGITS, t) else 0.0 for t in texts]}
        assert expected["by_difficulty"].count(None) == 4
        _check_line(line, expected, weights)
        assert "rewards/task/mean" not in line


def test_python_callables_and_a_built_in_in_trainer_steps(tiny_model, tmp_path, scored):
    weights = {"digit_share": 1.0, "accuracy": 0.5, "by_difficulty": 2.0}
    task = with_rewards(ColumnTask(), [digit_share, "accuracy", by_difficulty], list(weights.values()))
    trainer = Trainer(_config(tiny_model, tmp_path / "run"), task=task)
    for _ in range(2):
        line = trainer.step()
        texts, ids, examples = scored[-1]
        difficulty = [e.columns["difficulty"] for e in examples]
        expected = {"digit_share": digit_share(texts),
                    "accuracy": [float(t.strip() == e.answer) for t, e in zip(texts, examples)],
                    "by_difficulty": [None if d == 0 else d * len(i) / 10 for i, d in zip(ids, difficulty)]}
        if len(set(expected["accuracy"])) == 1:  # an untrained tiny model: stdev of constant values is 0
            assert line["rewards/accuracy/std"] == 0.0
        _check_line(line, expected, weights)
        assert line["rewards/accuracy/mean"] == pytest.approx(line["accuracy"])


def test_without_reward_functions_the_task_reward_is_logged_as_task(tiny_model, tmp_path):
    trainer = Trainer(_config(tiny_model, tmp_path / "run"), task=DigitShareTask())
    line = trainer.step()
    assert line["rewards/task/mean"] == pytest.approx(line["reward_mean"], rel=1e-6)
    assert line["rewards/task/std"] == pytest.approx(line["reward_std"], rel=1e-5, abs=1e-7)


# ----------------------------------------------------------------------------- through the CLI


FAST = ["--max-steps", "1", "--prompts-per-step", "2", "--num-generations", "2", "--num-eval", "2",
        "--no-eval-at-start", "--no-eval-at-end", "--no-progress"]


def test_cli_built_in_rewards_with_weights_write_their_metrics(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_model), "--layer", "1", "--output-dir", str(out), *FAST,
                 "--reward", "accuracy", "--reward", "format", "--reward-weights", "1,0.5"])
    assert code == 0, capsys.readouterr().err
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"rewards/accuracy/mean", "rewards/accuracy/std", "rewards/format/mean", "rewards/format/std"} <= set(line)
    assert line["rewards/accuracy/mean"] == pytest.approx(line["accuracy"])


def test_cli_jsonl_column_reaches_the_reward_and_metrics_match_by_hand(tiny_model, tmp_path, shaping_file, scored,
                                                                      capsys):
    """A JSONL file with a `difficulty` column, --reward file.py:by_difficulty --reward accuracy, weights 0.5,1."""
    data = tmp_path / "data.jsonl"
    pairs = [(7, 123), (40, 2), (315, 6), (99, 1), (5, 5), (12, 34), (250, 250), (1, 1), (60, 7), (3, 4)]
    data.write_text("".join(json.dumps({"prompt": f"{a:03d}+{b:03d}=", "answer": a + b, "difficulty": i % 4}) + "\n"
                            for i, (a, b) in enumerate(pairs)))
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_model), "--layer", "1", "--output-dir", str(out), "--dataset", str(data),
                 "--max-steps", "2", "--prompts-per-step", "4", "--num-generations", "3", "--max-completion-length",
                 "8", "--no-eval-at-start", "--no-eval-at-end", "--no-progress", "--reward",
                 f"{shaping_file}:by_difficulty", "--reward", "accuracy", "--reward-weights", "0.5,1"])
    assert code == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == len(scored) == 2
    for line, (texts, ids, examples) in zip(lines, scored):
        difficulty = [e.columns["difficulty"] for e in examples]
        expected = {"by_difficulty": [None if d == 0 else d * len(i) / 10 for i, d in zip(ids, difficulty)],
                    "accuracy": [float(answers_match(t, e.answer)) for t, e in zip(texts, examples)]}
        if expected["by_difficulty"].count(None) >= len(texts) - 1:
            continue  # too few values for a std to compare (the prompt order is seeded; this is rare)
        _check_line(line, expected, {"by_difficulty": 0.5, "accuracy": 1.0})


@pytest.mark.parametrize("body, fragment", [("sys.exit(0)", "exited (SystemExit(0)"),
                                            ("raise SystemExit", "exited (SystemExit,")])
def test_reward_function_that_exits_is_one_error_line_and_a_failure(tmp_path, body, fragment):
    """Before: sys.exit(0) in a reward function ended `sparselayer train` silently with status 0."""
    reward = tmp_path / "exits.py"
    reward.write_text(f"import sys\n\ndef stop(prompts, completions, **kwargs):\n    {body}\n")
    env = {**os.environ, "SPARSELAYER_AUTO_ROLLOUT": "hf", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "sparselayer.cli", "train", "--reward", f"{reward}:stop",
                           "--rollout", "hf", "--output-dir", str(tmp_path / "out"), *FAST],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, lines
    assert lines[0].startswith(f"sparselayer: error: reward function '{reward}:stop': {fragment}"), lines[0]
    assert "trained" not in done.stdout
