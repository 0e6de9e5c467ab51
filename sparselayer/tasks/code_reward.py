"""`code_tests`: a completion's code run against its row's test cases in the sandbox; the reward is the
fraction of tests passed.

The code is the completion's last ```python (or ```py) fenced block, else the whole completion. The tests
come from the row's columns (`row_tests` below, docs/rewards.md): assert statements or test code
(`test_list`, `tests`, `test`) or stdin/stdout pairs (`input_output`, `inputs` + `outputs`, or a list of
{input, output}). Each completion runs once in a fresh sandboxed interpreter (sparselayer.tasks.sandbox)
with code_harness.py, which reports how many tests passed; a timeout, a crash, an output flood, or no
report at all scores 0, and so does a completion without code. A row without tests gets None (not
applicable). Up to `workers` sandboxes run at once.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ..errors import ConfigError, RewardError, first_line
from .base import completion_text
from .sandbox import SandboxLimits, SandboxResult, run_python

NAME = "code_tests"
CODE_COLUMNS = ("test_list", "tests", "test", "input_output")  # looked for in this order, the first present wins
IO_COLUMNS = ("inputs", "outputs")  # two parallel lists (or one value each): stdin and expected stdout
SETUP_COLUMN = "test_setup_code"  # MBPP: code run after the completion's, before the tests
ENTRY_POINT_COLUMN = "entry_point"  # HumanEval: a `test` column defines check(candidate); check(entry_point) runs
HARNESS = Path(__file__).with_name("code_harness.py")
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)


def default_workers() -> int:
    """min(4, the CPUs this process may use)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus))


def extract_code(text: str) -> str:
    """The completion's code: its last ```python / ```py fenced block, else the whole text."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


@dataclass(frozen=True)
class RowTests:
    """One row's tests: code tests (each an assert or a block of test code) or (stdin, stdout) pairs,
    and setup code run between the completion's code and the code tests."""

    code: tuple[str, ...] = ()
    io: tuple[tuple[str, str], ...] = ()
    setup: str = ""

    def __len__(self) -> int:
        return len(self.code) + len(self.io)


def _text(value: Any, what: str) -> str:
    """A stdin or stdout value as text: text, a number, or a list of lines (joined with newlines)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
        return "\n".join(str(v) for v in value)
    raise RewardError(f"{NAME}: {what} is a {type(value).__name__}, expected text or a list of lines")


def _io_pairs(inputs: Any, outputs: Any, column: str) -> tuple[tuple[str, str], ...]:
    """(stdin, stdout) pairs from parallel lists (or one value each)."""
    inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    if len(inputs) != len(outputs):
        raise RewardError(f"{NAME}: column '{column}' has {len(inputs)} inputs and {len(outputs)} outputs")
    return tuple((_text(i, f"an input of '{column}'"), _text(o, f"an output of '{column}'"))
                 for i, o in zip(inputs, outputs))


def _parsed_json(value: str) -> Any:
    """`value` parsed when it is a JSON object or list (a CSV cell, or APPS's {"inputs", "outputs"} text), else
    None. A JSON list of asserts read as code would be a list literal that always "passes"."""
    if not value.lstrip().startswith(("{", "[")):
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, (dict, list)) else None


def _cases(column: str, value: Any, row: Mapping[str, Any]) -> RowTests:
    """The test cases held by one column value, in any of the recognised shapes."""
    setup = row.get(SETUP_COLUMN) or ""
    if isinstance(value, str) and (parsed := _parsed_json(value)) is not None:
        value = parsed
    if isinstance(value, Mapping) and "inputs" in value and "outputs" in value:
        return RowTests(io=_io_pairs(value["inputs"], value["outputs"], column))
    if isinstance(value, str):
        entry = row.get(ENTRY_POINT_COLUMN)
        return RowTests(code=(value + (f"\ncheck({entry})\n" if column == "test" and entry else ""),), setup=setup)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return RowTests(code=tuple(value), setup=setup)
    if isinstance(value, (list, tuple)) and all(isinstance(v, Mapping) and "input" in v and "output" in v
                                                for v in value):
        return RowTests(io=tuple((_text(v["input"], f"an input of '{column}'"),
                                   _text(v["output"], f"an output of '{column}'")) for v in value))
    raise RewardError(f"{NAME}: column '{column}' holds a {type(value).__name__} that is not test cases: expected "
                      "assert/test code (text or a list of texts), a list of {input, output}, or {inputs, outputs}")


def row_tests(row: Mapping[str, Any], column: str | None = None) -> RowTests | None:
    """The row's tests: from `column` when given, else the first of CODE_COLUMNS present, else `inputs` +
    `outputs`; None when the row has none."""
    if column is not None:
        value = row.get(column)
        return None if value is None else _cases(column, value, row)
    for name in CODE_COLUMNS:
        if row.get(name) is not None:
            return _cases(name, row[name], row)
    if all(row.get(name) is not None for name in IO_COLUMNS):
        return RowTests(io=_io_pairs(row["inputs"], row["outputs"], "inputs/outputs"))
    return None


@cache
def harness_source() -> str:
    """The text of code_harness.py, the program each sandbox runs."""
    return HARNESS.read_text(encoding="utf-8")


def run_tests(code: str, cases: RowTests, limits: SandboxLimits) -> tuple[int | None, SandboxResult]:
    """Run `code` against `cases` in a fresh sandbox: the number of tests passed (None when the harness did
    not report: a timeout, a crash, an early exit, a report out of range) and how the run ended."""
    token = secrets.token_hex(16)
    job = {"token": token, "code": code, "setup": cases.setup, "tests": list(cases.code),
           "io": [list(pair) for pair in cases.io], "output_bytes": limits.output_bytes}
    result = run_python(harness_source(), {"job.json": json.dumps(job)}, limits)
    reports = re.findall(rb"^" + token.encode() + rb" (\d+)$", result.stdout, re.MULTILINE)
    if result.status != "exited" or not reports or int(reports[-1]) > len(cases):
        return None, result
    return int(reports[-1]), result


def passed_fraction(code: str, cases: RowTests, limits: SandboxLimits) -> float:
    """The fraction of `cases` that `code` passes in a fresh sandbox: 0.0 without code, on timeout, on crash."""
    if not code.strip() or not len(cases):
        return 0.0
    passed, _ = run_tests(code, cases, limits)
    return (passed or 0) / len(cases)


@cache
def check_sandbox(limits: SandboxLimits) -> None:
    """Run one known-good job once per process and limits, so that a sandbox that cannot work here (no usable
    interpreter, a refused limit) is one clear error instead of a reward of 0 for every completion."""
    passed, result = run_tests("x = 1", RowTests(code=("assert x == 1",)), limits)
    if passed != 1:
        lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
        detail = first_line(lines[-1]) if lines else "no output on stderr"
        raise RewardError(f"{NAME}: the sandbox does not work here (a known-good test did not pass: "
                          f"{result.status}, exit status {result.returncode}): {detail}")


def code_tests_reward(column: str | None = None, limits: SandboxLimits | None = None,
                      workers: int | None = None) -> Callable[..., list[float | None]]:
    """The `code_tests` reward function, in TRL's convention: per completion, the fraction of its row's tests
    its code passes (None for a row without tests). `column`: the column holding the tests (unset: the
    recognised names); `limits`: the sandbox's; `workers`: sandboxes run at once (unset: min(4, CPUs))."""
    limits = limits or SandboxLimits()
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ConfigError(f"{NAME}: workers must be at least 1, got {workers}")

    def code_tests(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        rows = [{name: values[i] for name, values in columns.items() if isinstance(values, list)}
                for i in range(len(completions))]
        jobs = [(extract_code(completion_text(c)), row_tests(row, column)) for c, row in zip(completions, rows)]

        def score(job: tuple[str, RowTests | None]) -> float | None:
            code, cases = job
            return None if cases is None or not len(cases) else passed_fraction(code, cases, limits)

        if any(cases is not None and len(cases) for _, cases in jobs):
            check_sandbox(limits)
        with ThreadPoolExecutor(max_workers=min(workers, max(1, len(jobs)))) as pool:
            return list(pool.map(score, jobs))

    code_tests.__name__ = NAME
    return code_tests
