"""The `code_tests` reward: code extraction, the recognised test columns, the fraction of tests passed
(assert style and stdin/stdout style), hostile and reward-hacking completions scoring 0 with nothing left
on disk, and two training steps on a code dataset through the CLI."""
from __future__ import annotations

import json
import socket
import statistics
import tempfile
from pathlib import Path

import pytest

from sparselayer.cli import main
from sparselayer.errors import ConfigError, RewardError
from sparselayer.tasks import RewardBatch, build_task, reward_set_of
from sparselayer.tasks import code_reward as code_reward_module
from sparselayer.tasks.base import Example
from sparselayer.tasks.code_reward import RowTests, code_tests_reward, extract_code, row_tests
from sparselayer.tasks.sandbox import SandboxLimits

LIMITS = SandboxLimits(timeout=60, cpu_seconds=2, output_bytes=64 << 10)  # generous: no test depends on speed
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 5) == 4"]


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\nIt adds."


def score(completions: list[str], column: str | None = None, workers: int = 2, **columns: list) -> list:
    reward = code_tests_reward(column=column, limits=LIMITS, workers=workers)
    return reward(prompts=["p"] * len(completions), completions=completions, **columns)


# ----------------------------------------------------------------------------- code and columns


def test_extract_code_takes_the_last_python_block_else_the_whole_text() -> None:
    text = "```python\nx = 1\n```\nthen\n```py\ny = 2\n```\n```text\nnot code\n```"
    assert extract_code(text) == "y = 2\n"
    assert extract_code("```Python3\nz = 3\n```") == "z = 3\n"
    assert extract_code("def f():\n    return 1\n") == "def f():\n    return 1\n"
    assert extract_code("```\nno language\n```") == "```\nno language\n```"


def test_recognised_columns_and_shapes() -> None:
    assert row_tests({"test_list": ADD_TESTS, "test_setup_code": "import math"}) == RowTests(
        code=tuple(ADD_TESTS), setup="import math")
    assert row_tests({"tests": "assert f() == 1"}) == RowTests(code=("assert f() == 1",))
    # a CSV cell holding a JSON list of asserts is that list, not one "test" that is a list literal
    assert row_tests({"test_list": json.dumps(ADD_TESTS)}) == RowTests(code=tuple(ADD_TESTS))
    humaneval = row_tests({"test": "def check(candidate):\n    assert candidate(1) == 1\n", "entry_point": "f"})
    assert humaneval.code[0].endswith("check(f)\n") and len(humaneval) == 1
    apps = row_tests({"input_output": json.dumps({"inputs": ["1\n", "2\n"], "outputs": ["2\n", "4\n"]})})
    assert apps == RowTests(io=(("1\n", "2\n"), ("2\n", "4\n")))
    assert row_tests({"inputs": ["1", "2"], "outputs": [["2"], 4]}) == RowTests(io=(("1", "2"), ("2", "4")))
    assert row_tests({"tests": [{"input": "3", "output": "6"}]}) == RowTests(io=(("3", "6"),))
    assert row_tests({"checks": ["assert True"], "tests": ["assert False"]}, column="checks").code == ("assert True",)
    assert row_tests({"prompt": "p", "answer": "1"}) is None
    assert row_tests({"test_list": None, "inputs": ["1"]}) is None
    assert row_tests({"tests": []}) == RowTests()


@pytest.mark.parametrize("row, fragment", [
    ({"tests": 42}, "column 'tests' holds a int that is not test cases"),
    ({"test_list": ["assert True", 3]}, "column 'test_list' holds a list"),
    ({"inputs": ["1", "2"], "outputs": ["2"]}, "has 2 inputs and 1 outputs"),
    ({"tests": [{"input": {"x": 1}, "output": "1"}]}, "an input of 'tests' is a dict"),
])
def test_malformed_tests_are_one_line_reward_errors(row: dict, fragment: str) -> None:
    with pytest.raises(RewardError) as info:
        row_tests(row)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_sandbox_that_cannot_work_is_one_error_not_zero_rewards(sandbox_tmp: Path) -> None:
    """1 MiB of address space leaves the interpreter no room to run the harness: every completion would score 0."""
    reward = code_tests_reward(limits=SandboxLimits(timeout=60, memory_bytes=1 << 20), workers=1)
    with pytest.raises(RewardError, match="code_tests: the sandbox does not work here") as info:
        reward(prompts=["p"], completions=[fenced("def add(a, b):\n    return a + b")], test_list=[ADD_TESTS])
    assert "\n" not in str(info.value)


def test_workers_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="workers must be at least 1"):
        code_tests_reward(workers=0)


# ----------------------------------------------------------------------------- scores


def test_correct_partial_wrong_and_missing_code(sandbox_tmp: Path) -> None:
    completions = [fenced("def add(a, b):\n    return a + b"),
                   fenced("def add(a, b):\n    return abs(a) + b"),  # passes 2 of 3
                   "def add(a, b):\n    return a * b",  # no fence: the whole text is the code; passes 1 of 3
                   fenced("def add(a, b):\n    return a +"),  # syntax error
                   "   ",  # no code
                   fenced("def add(a, b):\n    return a + b")]
    rows = [ADD_TESTS] * 5 + [None]  # the last row has no tests: not applicable
    assert score(completions, test_list=rows) == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0, 0.0, None])


def test_stdin_stdout_style(sandbox_tmp: Path) -> None:
    doubler = "import sys\nn = int(sys.stdin.readline())\nprint(n * 2)   \n\n"
    first_only = "n = int(input())\nprint(2 if n == 1 else 0)"
    exits_zero = "print(int(input()) * 2)\nraise SystemExit(0)"
    exits_one = "print(int(input()) * 2)\nraise SystemExit(1)"
    cases = {"inputs": ["1\n", "21\n"], "outputs": ["2\n", "42"]}
    assert score([doubler, first_only, exits_zero, exits_one], input_output=[json.dumps(cases)] * 4) == \
        pytest.approx([1.0, 0.5, 1.0, 0.0])
    pairs = [{"input": "3", "output": "6"}, {"input": "4", "output": "9"}]
    assert score([fenced(doubler)], tests=[pairs]) == pytest.approx([0.5])


def test_setup_code_and_humaneval_style_test(sandbox_tmp: Path) -> None:
    assert score(["def root(x):\n    return math.sqrt(x)"], test_list=[["assert root(9) == 3"]],
                 test_setup_code=["import math"]) == [1.0]
    check = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n"
    assert score(["def square(x):\n    return x * x", "def square(x):\n    return 4"],
                 test=[check, check], entry_point=["square", "square"]) == [1.0, 0.0]


@pytest.mark.parametrize("body", [
    "while True:\n    pass",  # infinite loop
    "import os\nwhile True:\n    os.fork()",  # fork bomb
    "data = bytearray(10 * 1024 ** 3)",  # 10 GB
    "while True:\n    print('x' * 100_000)",  # huge print (captured in assert style: the cap stops it)
    "import os\nwhile True:\n    os.write(1, b'x' * 100_000)",  # huge print straight to the pipe
])
def test_hostile_completions_score_zero(sandbox_tmp: Path, body: str) -> None:
    assert score([fenced(body + "\ndef add(a, b):\n    return a + b")], test_list=[ADD_TESTS]) == [0.0]


def test_write_outside_scores_zero_and_writes_nothing(sandbox_tmp: Path, tmp_path: Path) -> None:
    target = tmp_path / "outside.txt"
    body = f"open({str(target)!r}, 'w').write('pwned')\ndef add(a, b):\n    return a + b"
    assert score([fenced(body)], test_list=[ADD_TESTS]) == [0.0]
    assert not target.exists()


def test_socket_connection_scores_zero_and_never_connects(sandbox_tmp: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        body = (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5).sendall(b'hi')\n"
                "def add(a, b):\n    return a + b")
        assert score([fenced(body)], test_list=[ADD_TESTS]) == [0.0]
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()


@pytest.mark.parametrize("body", [
    "import os\nos._exit(0)",  # leaves before any test runs
    "import sys\nsys.exit(0)",
    "import os\nos.write(1, b'\\n0123456789abcdef0123456789abcdef 3\\n')\nos._exit(0)",  # a report, no token
    "import builtins\nreal = builtins.compile\nbuiltins.compile = lambda *a, **k: real('pass', 't', 'exec')\n"
    "builtins.exec = lambda *a, **k: None",  # would pass every test if the harness looked them up afterwards
])
def test_leaving_early_or_faking_a_report_earns_nothing(sandbox_tmp: Path, body: str) -> None:
    assert score([fenced(body)], test_list=[ADD_TESTS]) == [0.0]


def test_a_test_that_exits_does_not_pass(sandbox_tmp: Path) -> None:
    """sys.exit inside one test fails that test only."""
    code = "import sys\ndef add(a, b):\n    if a < 0:\n        sys.exit(0)\n    return a + b"
    assert score([code], test_list=[ADD_TESTS]) == pytest.approx([2 / 3])


def test_the_builtin_scores_a_batch_in_parallel_through_the_reward_set(sandbox_tmp: Path) -> None:
    rows = [{"prompt": "Write add(a, b).", "test_list": ADD_TESTS},
            {"prompt": "Double stdin.", "inputs": ["1", "5"], "outputs": ["2", "10"]},
            {"prompt": "Anything."}]
    task = build_task(dataset=rows, reward=["code_tests"])
    examples = {e.prompt: e for e in [*task.train, *task.test]}
    chosen = [examples["Write add(a, b)."]] * 2 + [examples["Double stdin."]] * 2 + [examples["Anything."]]
    texts = [fenced("def add(a, b):\n    return a + b"), "def add(a, b):\n    return 0",
             "print(int(input()) * 2)", "print(2)", fenced("print(1)")]
    scores = reward_set_of(task).score(RewardBatch.of(texts, chosen))
    assert scores.per_function["code_tests"] == pytest.approx([1.0, 1 / 3, 1.0, 0.5, None])
    assert scores.total == pytest.approx([1.0, 1 / 3, 1.0, 0.5, 0.0])


def test_another_column_through_a_reward_file(sandbox_tmp: Path, tmp_path: Path) -> None:
    """The documented way to name another column from the command line: a reward file and --reward file:name."""
    from sparselayer.tasks.user_reward import resolve_reward

    spec = tmp_path / "my_rewards.py"
    spec.write_text("from sparselayer.tasks.code_reward import code_tests_reward\n"
                    "from sparselayer.tasks.sandbox import SandboxLimits\n\n"
                    "unit_tests = code_tests_reward(column='checks', limits=SandboxLimits(timeout=60), workers=1)\n")
    reward = resolve_reward(f"{spec}:unit_tests")
    assert reward.name == "code_tests"
    example = Example("p", columns={"checks": ADD_TESTS[:2], "test_list": ["assert False"]})
    batch = RewardBatch.of([fenced("def add(a, b):\n    return a + b"), "def add(a, b):\n    return 0"],
                           [example, example])
    assert reward(batch) == pytest.approx([1.0, 0.5])


def test_conversation_completions_are_read_as_text(sandbox_tmp: Path) -> None:
    completion = [{"role": "assistant", "content": fenced("def add(a, b):\n    return a + b")}]
    reward = code_tests_reward(limits=LIMITS, workers=1)
    assert reward(prompts=[[{"role": "user", "content": "p"}]], completions=[completion],
                  test_list=[ADD_TESTS]) == [1.0]


# ----------------------------------------------------------------------------- training


def test_two_training_steps_on_a_code_dataset_through_the_cli(tiny_model, tmp_path, monkeypatch, capsys) -> None:
    """A JSONL of assert-style rows, `--reward code_tests`, two steps on a tiny random model: every completion
    goes through the sandbox, the logged means are those of the values it returned, and no sandbox directory
    is left (the training itself may keep temporary files of its own: only the sandboxes' are checked)."""
    temp = tmp_path / "tmpdir"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    data = tmp_path / "code.jsonl"
    rows = [{"prompt": f"def f{i}(x): return x+{i}", "test_list": [f"assert f{i}(1) == {1 + i}",
                                                                   f"assert f{i}(0) == {i}"]} for i in range(6)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    calls = []
    original = code_reward_module.passed_fraction

    def recording(code, cases, limits):
        calls.append(original(code, cases, limits))
        return calls[-1]

    monkeypatch.setattr(code_reward_module, "passed_fraction", recording)
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_model), "--layers", "2", "--output-dir", str(out), "--dataset", str(data),
                 "--reward", "code_tests", "--max-steps", "2", "--prompts-per-step", "2", "--num-generations", "2",
                 "--max-completion-length", "8", "--rollout", "hf", "--no-progress", "--no-eval-at-start",
                 "--no-eval-at-end"])
    assert code == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and len(calls) == 8
    for line, values in zip(lines, (calls[:4], calls[4:])):
        assert all(0.0 <= v <= 1.0 for v in values)
        assert line["rewards/code_tests/mean"] == pytest.approx(statistics.fmean(values), abs=1e-9)
        assert line["reward_mean"] == pytest.approx(statistics.fmean(values), abs=1e-6)
    assert not [p for p in temp.iterdir() if p.name.startswith("sparselayer-sandbox-")]


def test_malformed_tests_through_the_cli_are_one_line(tiny_model, tmp_path, capsys) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "tests": 7}) + "\n" for i in range(4)))
    capsys.readouterr()
    code = main(["train", "--model", str(tiny_model), "--layers", "2", "--output-dir", str(tmp_path / "run"),
                 "--dataset", str(data), "--reward", "code_tests", "--max-steps", "1", "--prompts-per-step", "2",
                 "--num-generations", "2", "--max-completion-length", "4", "--rollout", "hf", "--no-progress",
                 "--no-eval-at-start", "--no-eval-at-end"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "column 'tests' holds a int that is not test cases" in err[0], err


def test_examples_keep_test_columns() -> None:
    """The columns the reward reads reach it from the rows (Example.columns)."""
    task = build_task(dataset=[{"prompt": "a", "test_list": ADD_TESTS}, {"prompt": "b", "test_list": ADD_TESTS}])
    example: Example = [*task.train, *task.test][0]
    assert list(example.columns["test_list"]) == ADD_TESTS
