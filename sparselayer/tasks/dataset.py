"""A task read from the user's own data file (JSONL or Parquet) of prompts and reference answers.

Rows need a `prompt` (or `question`) and an `answer`; GSM8K-style answers ending in `#### 72` are
kept whole and checked on their final part. Every problem with the file is a one-line DataError.
"""
from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparselayer.errors import ConfigError, DataError
from sparselayer.tasks.base import Example, Task
from sparselayer.tasks.math_answers import answers_match

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SPLITS = ("train", "test")


class DatasetTask(Task):
    """Prompts and answers from a data file, judged by math answer matching."""

    def __init__(self, name: str, train: Sequence[Example], test: Sequence[Example]) -> None:
        self.name = name
        self._train = list(train)
        self._test = list(test)

    @property
    def train(self) -> Sequence[Example]:
        """Training prompts."""
        return self._train

    @property
    def test(self) -> Sequence[Example]:
        """Held-out prompts, disjoint from `train`."""
        return self._test

    def is_correct(self, completion: str, example: Example) -> bool:
        """Whether the completion's final answer matches the example's reference answer."""
        return answers_match(completion, example.answer)


def _first_line(text: str) -> str:
    """First non-empty line of a message, so errors stay one line."""
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """Rows of a JSON-lines file (a whole-file JSON array is accepted too), each with its location."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read data file {path}: {_first_line(e)}") from None
    if not text.strip():
        raise DataError(f"data file {path} is empty")
    if text.lstrip().startswith("["):
        items = _parse_json(path, text, 0)
        return [(f"row {i}", _as_object(path, item, f"row {i}")) for i, item in enumerate(items, start=1)]
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON may hold U+2028
        if line.strip():
            rows.append((f"line {number}", _as_object(path, _parse_json(path, line, number), f"line {number}")))
    return rows


def _parse_json(path: Path, text: str, line_number: int) -> Any:
    """One JSON value from `text`, which starts at `line_number` (0: the whole file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = line_number or e.lineno
        raise DataError(f"{path} line {line}: malformed JSON ({e.msg} at column {e.colno})") from None


def _as_object(path: Path, value: Any, where: str) -> dict:
    """The value itself when it is a JSON object (one row), else a DataError."""
    if not isinstance(value, dict):
        kind = type(value).__name__
        raise DataError(f"{path} {where}: expected a JSON object with 'prompt' and 'answer', got {kind}")
    return value


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    """Rows of a Parquet file, each with its 1-based row number."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt / non-Parquet files
        raise DataError(f"cannot read Parquet file {path}: {_first_line(e)}") from None
    return [(f"row {i}", row) for i, row in enumerate(rows, start=1)]


def _read_rows(path: Path) -> list[tuple[str, dict]]:
    """Rows of a data file chosen by its extension, after checking the file exists."""
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"data path is not a file: {path}")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        rows = _read_jsonl(path)
    elif suffix in PARQUET_SUFFIXES:
        rows = _read_parquet(path)
    else:
        raise DataError(f"unsupported data file extension '{path.suffix}' for {path}: use .jsonl, .json or .parquet")
    if not rows:
        raise DataError(f"data file {path} has no rows")
    return rows


def _prompt(path: Path, row: dict, where: str) -> str:
    """The row's prompt (`prompt`, or `question` as alias), non-empty."""
    value = row.get("prompt")
    if value is None:
        value = row.get("question")
    if value is None:
        raise DataError(f"{path} {where}: missing 'prompt' (or 'question')")
    if not isinstance(value, str):
        raise DataError(f"{path} {where}: 'prompt' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{path} {where}: empty prompt")
    return value


def _answer(path: Path, row: dict, where: str) -> str:
    """The row's reference answer as text (numbers are accepted and written without a trailing .0)."""
    value = row.get("answer")
    if value is None:
        raise DataError(f"{path} {where}: missing 'answer'")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{path} {where}: 'answer' must be a string or number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise DataError(f"{path} {where}: 'answer' is {value}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value)
    if not text.strip():
        raise DataError(f"{path} {where}: empty answer")
    return text


def _split(path: Path, row: dict, where: str) -> str | None:
    """The row's explicit split ('train' or 'test'), or None when the row has none."""
    value = row.get("split")
    if value is None:
        return None
    if value not in SPLITS:
        raise DataError(f"{path} {where}: 'split' must be 'train' or 'test', got {value!r}")
    return value


def _holdout(examples: list[Example], eval_fraction: float, max_eval: int, seed: int) -> tuple[list, list]:
    """Deterministic (train, test) split: a seeded shuffle picks round(fraction * n) test rows,
    capped at max_eval, and at least one when n >= 2 (unless fraction or cap is 0: no held-out set)."""
    n = len(examples)
    k = min(round(eval_fraction * n), max_eval)
    if n >= 2 and eval_fraction > 0 and max_eval > 0:
        k = max(k, 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    train = [ex for i, ex in enumerate(examples) if i not in held]
    test = [ex for i, ex in enumerate(examples) if i in held]
    return train, test


def _check_settings(eval_fraction: float, max_eval: int) -> None:
    """Reject a held-out fraction outside [0, 1] or a negative cap."""
    if not 0.0 <= eval_fraction <= 1.0:
        raise ConfigError(f"eval fraction must be between 0 and 1, got {eval_fraction}")
    if max_eval < 0:
        raise ConfigError(f"max eval examples must be >= 0, got {max_eval}")


def load_dataset_task(
    path: str | Path, eval_fraction: float = 0.1, max_eval: int = 500, seed: int = 0
) -> DatasetTask:
    """Load a JSONL/Parquet file of prompts and answers as a task, split by its `split` column if
    present, else by a seeded held-out sample."""
    _check_settings(eval_fraction, max_eval)
    path = Path(path)
    rows = _read_rows(path)
    examples = [Example(prompt=_prompt(path, row, where), answer=_answer(path, row, where)) for where, row in rows]
    splits = [_split(path, row, where) for where, row in rows]
    if any(s is not None for s in splits):
        train, test = _explicit_split(path, examples, splits, [where for where, _ in rows])
    else:
        train, test = _holdout(examples, eval_fraction, max_eval, seed)
    if not train:
        raise DataError(f"{path}: the training split is empty ({len(test)} of {len(examples)} rows are held out)")
    return DatasetTask(f"dataset:{path.name}", train, test)


def _explicit_split(
    path: Path, examples: list[Example], splits: list[str | None], wheres: list[str]
) -> tuple[list, list]:
    """(train, test) from per-row `split` values; every row must then carry one."""
    missing = next((where for where, s in zip(wheres, splits) if s is None), None)
    if missing is not None:
        raise DataError(f"{path} {missing}: missing 'split' (other rows have one)")
    train = [ex for ex, s in zip(examples, splits) if s == "train"]
    test = [ex for ex, s in zip(examples, splits) if s == "test"]
    return train, test
