"""A task read from the user's own data: a JSONL, Parquet or CSV file, a folder written by `datasets`'
save_to_disk (a Dataset or a DatasetDict), or in Python a `datasets.Dataset`/`DatasetDict` or a list of dicts.

Rows hold a prompt, `prompt` (or `question`): text, or a conversation (TRL's conversational format: a
list of {"role", "content"} messages); an optional `answer` (GSM8K-style answers ending in `#### 72` are
kept whole and checked on their final part; without answers a task has no accuracy); and any other
columns, which reach reward functions through `Example.columns` (the answer too). Held-out rows come
from the eval source, else the held-out split of a DatasetDict (test, else validation), else a
`split` column (train/test), else a seeded 10% sample (at most 500 rows).

Each format is read by what reads it best: JSONL line by line with the json module, so that an error
names its line and a row's size is checked before it is parsed; Parquet with pyarrow (what `datasets`
uses too, without its cache); CSV with the csv module, every cell kept as text ("007" keeps its zeros);
save_to_disk folders and Dataset objects with `datasets`. Limits: a row nested deeper than MAX_DEPTH
levels or holding more than MAX_ROW_CHARS characters of text is refused (such rows are no prompts, and
deeper JSON used to crash the parser). Every problem is a one-line DataError naming the source and row.
"""
from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparselayer.errors import ConfigError, DataError, first_line
from sparselayer.tasks.base import Example, ListTask, Prompt
from sparselayer.tasks.chat import conversation_problem, plain_conversation
from sparselayer.tasks.math_answers import answers_match

MAX_DEPTH = 32  # nesting levels of a row: the row object is level 1, a conversation 2, its messages 3
MAX_ROW_CHARS = 1 << 20  # characters of text in one row (a JSONL line, or the strings of any other row): 1 MiB
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
CSV_SUFFIXES = (".csv",)
PROMPT_COLUMNS = ("prompt", "question")  # the first present names the prompt
SPLITS = ("train", "test")  # values of a `split` column
HELD_OUT_SPLITS = ("test", "validation")  # a DatasetDict's held-out split, in this order of preference

Row = tuple[str, dict]  # (where: "line 3" / "row 3" / "test row 3", the row)


class DatasetTask(ListTask):
    """Prompts and optional answers from a data source, judged by math answer matching."""

    def is_correct(self, completion: str, example: Example) -> bool:
        """Whether the completion's final answer matches the reference answer (never, for a row without one)."""
        return example.answer is not None and answers_match(completion, example.answer)


@dataclass
class Source:
    """The rows of one data source, by split (the key None: a source without named splits)."""

    label: str  # how errors name the source: its path, or "dataset" for an object
    splits: dict[str | None, list[Row]]


# -- reading -----------------------------------------------------------------------------------------



def read_source(data: Any) -> Source:
    """The rows of a file or folder path, a `datasets.Dataset`/`DatasetDict`, or a list of dicts."""
    if isinstance(data, (str, Path)):
        source = _read_path(Path(data))
    elif isinstance(data, (list, tuple)):
        source = Source("dataset", {None: _records("dataset", data)})
    else:
        source = _from_datasets_object(data, "dataset")
    if not any(source.splits.values()):
        raise DataError(f"{source.label} has no rows")
    return source


def _read_path(path: Path) -> Source:
    """The rows of a data file chosen by its extension, or of a save_to_disk folder."""
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        return _read_folder(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        rows = _read_jsonl(path)
    elif suffix in PARQUET_SUFFIXES:
        rows = _read_parquet(path)
    elif suffix in CSV_SUFFIXES:
        rows = _read_csv(path)
    else:
        raise DataError(f"unsupported data file extension '{path.suffix}' for {path}: use .jsonl, .json, .parquet, "
                        ".csv or a folder written by datasets' save_to_disk")
    return Source(str(path), {None: rows})


def _read_jsonl(path: Path) -> list[Row]:
    """Rows of a JSON-lines file (a whole-file JSON array is accepted too), each with its location."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read data file {path}: {first_line(e)}") from None
    if not text.strip():
        raise DataError(f"data file {path} is empty")
    if text.lstrip().startswith("["):
        items = _parse_json(path, text, 0)
        return [(f"row {i}", _as_object(path, item, f"row {i}")) for i, item in enumerate(items, start=1)]
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON may hold U+2028
        if len(line) > MAX_ROW_CHARS:  # before parsing: a huge line is refused without building it
            raise DataError(f"{path} line {number}: {_too_much_text()}")
        if line.strip():
            rows.append((f"line {number}", _as_object(path, _parse_json(path, line, number), f"line {number}")))
    return rows


def _parse_json(path: Path, text: str, line_number: int) -> Any:
    """One JSON value from `text`, which starts at `line_number` (0: the whole file)."""
    where = f"{path} line {line_number}" if line_number else str(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {line_number or e.lineno}: malformed JSON ({e.msg} at column {e.colno})") \
            from None
    except RecursionError:  # the json module recurses once per level: thousands of levels exhaust the stack
        raise DataError(f"{where}: {_too_deep()}") from None


def _as_object(path: Path, value: Any, where: str) -> dict:
    """The value itself when it is a JSON object (one row), else a DataError."""
    if not isinstance(value, dict):
        kind = type(value).__name__
        raise DataError(f"{path} {where}: expected a JSON object with a 'prompt', got {kind}")
    return value


def _read_parquet(path: Path) -> list[Row]:
    """Rows of a Parquet file, each with its 1-based row number."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt / non-Parquet files
        raise DataError(f"cannot read Parquet file {path}: {first_line(e)}") from None
    return [(f"row {i}", row) for i, row in enumerate(rows, start=1)]


def _read_csv(path: Path) -> list[Row]:
    """Rows of a CSV file with a header line; cells stay text. Row 1 is the first line after the header."""
    previous = csv.field_size_limit(MAX_ROW_CHARS)
    rows: list[Row] = []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            for number, row in enumerate(csv.DictReader(handle), start=1):
                if None in row:
                    raise DataError(f"{path} row {number}: more cells than the header has columns")
                rows.append((f"row {number}", row))
    except csv.Error as e:
        detail = _too_much_text() if "field larger than field limit" in str(e) else first_line(e)
        raise DataError(f"{path} row {len(rows) + 1}: {detail}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read data file {path}: {first_line(e)}") from None
    finally:
        csv.field_size_limit(previous)
    return rows


def _read_folder(path: Path) -> Source:
    """The rows of a folder written by save_to_disk: one Dataset, or a DatasetDict's splits."""
    datasets = _datasets_module(path)
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as e:  # FileNotFoundError for other folders, JSON and Arrow errors for damaged ones
        raise DataError(f"{path} is not a dataset folder written by datasets' save_to_disk: {first_line(e)}") \
            from None
    return _from_datasets_object(data, str(path))


def _datasets_module(what: Any):
    """The `datasets` package, imported on first use (a DataError when it is not installed)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading {what} needs the datasets package: pip install datasets") from None
    return datasets


def _from_datasets_object(data: Any, label: str) -> Source:
    """The rows of a `datasets.Dataset` (one part) or `DatasetDict` (a part per split)."""
    datasets = _datasets_module(label)
    if isinstance(data, datasets.DatasetDict):
        return Source(label, {name: _records(label, part.to_list(), f"{name} ") for name, part in data.items()})
    if isinstance(data, datasets.Dataset):
        return Source(label, {None: _records(label, data.to_list())})
    raise DataError(f"unsupported dataset of type {type(data).__name__}: give a file or folder path, a "
                    "datasets.Dataset or DatasetDict, or a list of dicts")


def _records(label: str, items: Sequence[Any], prefix: str = "") -> list[Row]:
    """Numbered rows of a list of mappings (a DataError for anything else)."""
    rows = []
    for i, item in enumerate(items, start=1):
        if not isinstance(item, Mapping):
            raise DataError(f"{label} {prefix}row {i}: expected a dict with a 'prompt', got {type(item).__name__}")
        rows.append((f"{prefix}row {i}", dict(item)))
    return rows


# -- limits ------------------------------------------------------------------------------------------


def _too_deep() -> str:
    return f"nested deeper than {MAX_DEPTH} levels (the limit of a row)"


def _too_much_text() -> str:
    return f"more than {MAX_ROW_CHARS // (1 << 20)} MiB of text (the limit of a row)"


def check_limits(label: str, where: str, row: Any) -> None:
    """DataError when a row nests deeper than MAX_DEPTH levels or holds more than MAX_ROW_CHARS characters of
    text (keys and strings). Iterative, and it stops at the limit, so any input is checked in bounded time."""
    stack, chars = [(row, 1)], 0
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (str, bytes)):
            chars += len(value)
            if chars > MAX_ROW_CHARS:
                raise DataError(f"{label} {where}: {_too_much_text()}")
        elif isinstance(value, (Mapping, list, tuple)):
            if depth > MAX_DEPTH:
                raise DataError(f"{label} {where}: {_too_deep()}")
            items = [x for kv in value.items() for x in kv] if isinstance(value, Mapping) else value
            stack.extend((item, depth + 1) for item in items)


# -- rows to examples --------------------------------------------------------------------------------


def _prompt(label: str, row: dict, where: str) -> tuple[str, Prompt]:
    """The row's prompt column and prompt: non-empty text, or a valid conversation (as plain dicts)."""
    column = next((c for c in PROMPT_COLUMNS if row.get(c) is not None), None)
    if column is None:
        raise DataError(f"{label} {where}: missing 'prompt' (or 'question')")
    value = row[column]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{label} {where}: empty prompt")
        return column, value
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{label} {where}: '{column}' must be text or a list of {{role, content}} messages, "
                        f"got {type(value).__name__}")
    problem = conversation_problem(value)
    if problem:
        raise DataError(f"{label} {where}: {problem}")
    return column, plain_conversation(value)


def _answer(label: str, row: dict, where: str) -> str | None:
    """The row's reference answer as text (numbers without a trailing .0), or None when it has none."""
    value = row.get("answer")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{label} {where}: 'answer' must be a string or number, got {type(value).__name__} "
                        "(a structured reference belongs in another column, which reward functions receive)")
    if isinstance(value, float) and not math.isfinite(value):
        raise DataError(f"{label} {where}: 'answer' is {value}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value)
    if not text.strip():
        raise DataError(f"{label} {where}: empty answer")
    return text


def _example(label: str, where: str, row: dict) -> Example:
    """One row as an Example: its prompt, its answer, and every column but the prompt's."""
    check_limits(label, where, row)
    column, prompt = _prompt(label, row, where)
    columns = {k: v for k, v in row.items() if k != column}
    return Example(prompt, _answer(label, row, where), columns, source=f"{label} {where}")


def _examples(label: str, rows: list[Row]) -> list[Example]:
    """The rows as Examples; answers are all present or all absent (a gap is a DataError naming the row)."""
    examples = [_example(label, where, row) for where, row in rows]
    if any(e.answer is not None for e in examples):
        gap = next((where for (where, _), e in zip(rows, examples) if e.answer is None), None)
        if gap is not None:
            raise DataError(f"{label} {gap}: missing 'answer' (other rows have one)")
    return examples


# -- splits ------------------------------------------------------------------------------------------


def _named_part(source: Source, wanted: str | None, preferred: Sequence[str], purpose: str) -> str:
    """The split of a DatasetDict to use: `wanted`, else the first of `preferred` it has, else its only split."""
    names = [name for name in source.splits if name is not None]
    if wanted is not None:
        if wanted not in names:
            raise DataError(f"{source.label} has no split {wanted!r}: its splits are {', '.join(names)}")
        return wanted
    found = next((name for name in preferred if name in names), None)
    if found is None and len(names) != 1:
        raise DataError(f"{source.label} has splits {', '.join(names)} and none named {' or '.join(preferred)}: "
                        f"choose the {purpose} split with --dataset-split")
    return found or names[0]


def _split_value(label: str, row: dict, where: str, allowed: Sequence[str]) -> str | None:
    """The row's `split` value, or None when the row has none."""
    value = row.get("split")
    if value is not None and value not in allowed:
        names = " or ".join(repr(s) for s in allowed)
        raise DataError(f"{label} {where}: 'split' must be {names}, got {value!r}")
    return value


def _by_split_column(label: str, rows: list[Row], train_name: str) -> tuple[list[Row], list[Row]] | None:
    """(training rows, held-out 'test' rows) by the rows' `split` column, or None when no row has one."""
    allowed = tuple(dict.fromkeys((*SPLITS, train_name)))
    values = [_split_value(label, row, where, allowed) for where, row in rows]
    if all(v is None for v in values):
        return None
    missing = next((where for (where, _), v in zip(rows, values) if v is None), None)
    if missing is not None:
        raise DataError(f"{label} {missing}: missing 'split' (other rows have one)")
    train = [r for r, v in zip(rows, values) if v == train_name]
    held = [r for r, v in zip(rows, values) if v == "test" and train_name != "test"]
    return train, held


def _train_and_held(source: Source, split: str | None) -> tuple[list[Row], list[Row] | None]:
    """The rows to train on and the source's own held-out rows (None: it has none; a sample is taken)."""
    if None not in source.splits:  # a DatasetDict: named splits
        train_name = _named_part(source, split, ("train",), "training")
        held_name = next((n for n in HELD_OUT_SPLITS if n in source.splits and n != train_name), None)
        return source.splits[train_name], source.splits[held_name] if held_name else None
    rows = source.splits[None]
    parts = _by_split_column(source.label, rows, split or "train")
    if parts is None and split is not None:
        raise ConfigError(f"--dataset-split {split}: {source.label} has no splits (it is neither a DatasetDict "
                          "nor has a 'split' column)")
    return parts if parts is not None else (rows, None)


def _held_out_rows(source: Source) -> list[Row]:
    """The held-out rows of an eval source: a DatasetDict's test/validation split, its `split` column's test
    rows, or all its rows."""
    if None not in source.splits:
        return source.splits[_named_part(source, None, HELD_OUT_SPLITS, "held-out")]
    rows = source.splits[None]
    values = [_split_value(source.label, row, where, SPLITS) for where, row in rows]
    if all(v is None for v in values):
        return rows
    return [r for r, v in zip(rows, values) if v == "test"]


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


def _task_name(data: Any, source: Source) -> str:
    """dataset:<file or folder name> for a path, dataset for an object."""
    return f"dataset:{Path(data).name}" if isinstance(data, (str, Path)) else source.label


# -- the task ----------------------------------------------------------------------------------------


def dataset_task(data: Any, *, split: str | None = None, eval_data: Any = None, eval_fraction: float = 0.1,
                 max_eval: int = 500, seed: int = 0, name: str | None = None) -> DatasetTask:
    """A task from `data`: a JSONL/Parquet/CSV file or save_to_disk folder path, a `datasets.Dataset` or
    `DatasetDict`, or a list of dicts.

    split: the split to train on (a DatasetDict's, or a `split` column's value; unset: train, else the only
    split). eval_data: held-out rows from another source (same kinds). Without it the held-out rows are the
    source's own (test/validation split, `split` column), else a seeded sample of `eval_fraction` (at most
    `max_eval` rows, seeded by `seed`).
    """
    _check_settings(eval_fraction, max_eval)
    source = read_source(data)
    train_rows, held_rows = _train_and_held(source, split)
    if eval_data is not None:
        eval_source = read_source(eval_data)
        train, test = _examples(source.label, train_rows), _examples(eval_source.label, _held_out_rows(eval_source))
        if not test:
            raise DataError(f"{eval_source.label} has no held-out rows (its 'split' column has no 'test' rows)")
    elif held_rows is not None:
        examples = _examples(source.label, train_rows + held_rows)
        train, test = examples[: len(train_rows)], examples[len(train_rows):]
    else:
        train, test = _holdout(_examples(source.label, train_rows), eval_fraction, max_eval, seed)
    if not train:
        raise DataError(f"{source.label}: the training split is empty ({len(test)} held-out rows)")
    return DatasetTask(name or _task_name(data, source), train, test)


def load_dataset_task(path: str | Path, eval_fraction: float = 0.1, max_eval: int = 500, seed: int = 0,
                      split: str | None = None, eval_path: str | Path | None = None) -> DatasetTask:
    """A task from a data file or folder path (`dataset_task` with its settings by position)."""
    return dataset_task(path, split=split, eval_data=eval_path, eval_fraction=eval_fraction, max_eval=max_eval,
                        seed=seed)
