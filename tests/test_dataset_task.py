"""DatasetTask loading from real JSONL / Parquet files, its splits, and its one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparselayer.errors import ConfigError, DataError
from sparselayer.tasks.base import Example
from sparselayer.tasks.dataset import DatasetTask, load_dataset_task


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def numbered_rows(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(n)]


def load_error(path: Path, **kwargs) -> str:
    """The message of the DataError raised for `path`, checked to be one line naming the file."""
    with pytest.raises(DataError) as info:
        load_dataset_task(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert path.name in message
    return message


def test_gsm8k_jsonl_keeps_full_answer_and_checks_final_part(tmp_path: Path) -> None:
    rows = [
        {"question": "Natalia sold 48 clips and half as many more. Total?",
         "answer": "48/2 = 24\n48 + 24 = 72\n#### 72"},
        {"question": "A big sum?", "answer": "600 + 634 = 1,234\n#### 1,234"},
    ] + numbered_rows(8)
    task = load_dataset_task(write_jsonl(tmp_path / "gsm8k.jsonl", rows), eval_fraction=0.0)

    assert isinstance(task, DatasetTask)
    assert task.name == "dataset:gsm8k.jsonl"
    natalia = next(ex for ex in task.train + task.test if ex.prompt.startswith("Natalia"))
    assert natalia.answer == rows[0]["answer"]
    assert task.is_correct("24 + 48 gives \\boxed{72}", natalia)
    assert not task.is_correct("\\boxed{71}", natalia)
    big = next(ex for ex in task.train + task.test if ex.prompt == "A big sum?")
    assert task.is_correct("The result is 1234.", big)
    assert task.reward("#### 1,234", big) == 1.0


def test_numeric_answers_become_text(tmp_path: Path) -> None:
    rows = [{"prompt": "p1", "answer": 72}, {"prompt": "p2", "answer": 72.0}, {"prompt": "p3", "answer": 0.5}]
    task = load_dataset_task(write_jsonl(tmp_path / "nums.json", rows), eval_fraction=0.0)
    answers = sorted(ex.answer for ex in task.train + task.test)
    assert answers == ["0.5", "72", "72"]
    half = next(ex for ex in task.train + task.test if ex.answer == "0.5")
    assert task.is_correct("\\boxed{\\frac{1}{2}}", half)


def test_parquet_file_loads_like_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(numbered_rows(10)), path)
    from_parquet = load_dataset_task(path, seed=3)
    from_jsonl = load_dataset_task(write_jsonl(tmp_path / "data.jsonl", numbered_rows(10)), seed=3)
    assert from_parquet.name == "dataset:data.parquet"
    assert list(from_parquet.train) == list(from_jsonl.train)
    assert list(from_parquet.test) == list(from_jsonl.test)


def test_holdout_split_is_deterministic_disjoint_and_sized(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", numbered_rows(50))
    first = load_dataset_task(path, eval_fraction=0.2, seed=7)
    again = load_dataset_task(path, eval_fraction=0.2, seed=7)
    other = load_dataset_task(path, eval_fraction=0.2, seed=8)

    assert len(first.test) == 10 and len(first.train) == 40
    assert set(first.train).isdisjoint(first.test)
    assert set(first.train) | set(first.test) == {Example(**r) for r in numbered_rows(50)}
    assert list(first.test) == list(again.test)
    assert list(first.test) != list(other.test)


def test_holdout_size_is_capped_and_at_least_one(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", numbered_rows(40))
    assert len(load_dataset_task(path, eval_fraction=0.5, max_eval=3).test) == 3
    assert len(load_dataset_task(path, eval_fraction=0.001).test) == 1
    single = load_dataset_task(write_jsonl(tmp_path / "one.jsonl", numbered_rows(1)))
    assert len(single.train) == 1 and len(single.test) == 0
    assert len(load_dataset_task(path, eval_fraction=0.0).test) == 0
    assert len(load_dataset_task(path, max_eval=0).test) == 0


def test_explicit_split_column_is_used(tmp_path: Path) -> None:
    rows = [dict(r, split="test" if i % 3 == 0 else "train") for i, r in enumerate(numbered_rows(9))]
    task = load_dataset_task(write_jsonl(tmp_path / "split.jsonl", rows), eval_fraction=0.9)
    assert [ex.prompt for ex in task.test] == [rows[i]["prompt"] for i in (0, 3, 6)]
    assert len(task.train) == 6


def test_blank_lines_and_json_array_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "gaps.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in numbered_rows(3)).replace("\n", "\n\n") + "\n\n")
    assert len(load_dataset_task(path, eval_fraction=0.0).train) == 3
    array = tmp_path / "array.json"
    array.write_text(json.dumps(numbered_rows(4), indent=2))
    assert len(load_dataset_task(array, eval_fraction=0.0).train) == 4


def test_missing_file(tmp_path: Path) -> None:
    assert "not found" in load_error(tmp_path / "absent.jsonl")


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("prompt,answer\nq,1\n")
    message = load_error(path)
    assert "unsupported" in message and ".csv" in message


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_jsonl(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    assert "empty" in load_error(path)


def test_parquet_without_rows(tmp_path: Path) -> None:
    path = tmp_path / "none.parquet"
    schema = pa.schema([("prompt", pa.string()), ("answer", pa.string())])
    pq.write_table(pa.Table.from_pylist([], schema=schema), path)
    assert "no rows" in load_error(path)


def test_file_that_is_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "fake.parquet"
    path.write_text("not parquet at all")
    assert "cannot read Parquet" in load_error(path)


def test_malformed_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in numbered_rows(2)] + ['{"prompt": "x", "answer": ']
    path.write_text("\n".join(lines) + "\n")
    message = load_error(path)
    assert "line 3" in message and "malformed JSON" in message


def test_row_that_is_not_an_object(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "list.jsonl", numbered_rows(1) + [["q", "a"]])
    assert "line 2: expected a JSON object" in load_error(path)


def test_row_missing_prompt(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "noprompt.jsonl", numbered_rows(2) + [{"answer": "3"}])
    assert "line 3: missing 'prompt'" in load_error(path)


def test_row_missing_answer(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "noanswer.jsonl", [{"prompt": "q"}] + numbered_rows(2))
    assert "line 1: missing 'answer'" in load_error(path)


def test_parquet_row_missing_answer_names_row(tmp_path: Path) -> None:
    path = tmp_path / "gap.parquet"
    rows = numbered_rows(3)
    rows[1]["answer"] = None
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert "row 2: missing 'answer'" in load_error(path)


def test_row_with_empty_prompt(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "blank.jsonl", numbered_rows(1) + [{"prompt": "   ", "answer": "1"}])
    assert "line 2: empty prompt" in load_error(path)


def test_row_with_non_string_prompt_or_bad_answer(tmp_path: Path) -> None:
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": "hi"}], "answer": "1"}])
    assert "'prompt' must be a string, got list" in load_error(chat)
    boolean = write_jsonl(tmp_path / "bool.jsonl", [{"prompt": "q", "answer": True}])
    assert "'answer' must be a string or number" in load_error(boolean)


def test_unknown_split_value(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "val.jsonl", [dict(numbered_rows(1)[0], split="validation")])
    assert "'split' must be 'train' or 'test'" in load_error(path)


def test_partial_split_column(tmp_path: Path) -> None:
    rows = numbered_rows(3)
    rows[0]["split"] = "train"
    rows[1]["split"] = "test"
    path = write_jsonl(tmp_path / "partial.jsonl", rows)
    assert "line 3: missing 'split'" in load_error(path)


def test_empty_training_split(tmp_path: Path) -> None:
    only_test = write_jsonl(tmp_path / "alltest.jsonl", [dict(r, split="test") for r in numbered_rows(3)])
    assert "training split is empty" in load_error(only_test)
    everything_held = write_jsonl(tmp_path / "held.jsonl", numbered_rows(4))
    assert "training split is empty" in load_error(everything_held, eval_fraction=1.0)


def test_bad_eval_fraction_is_a_config_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", numbered_rows(4))
    with pytest.raises(ConfigError, match="between 0 and 1"):
        load_dataset_task(path, eval_fraction=1.5)
