"""DatasetTask from real JSONL / Parquet / CSV files, save_to_disk folders, Dataset objects and lists of dicts:
prompts (text or conversations), optional answers, extra columns, splits, limits, and its one-line errors."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparselayer.cli import main
from sparselayer.errors import ConfigError, DataError
from sparselayer.tasks import build_task
from sparselayer.tasks.base import Example
from sparselayer.tasks.dataset import MAX_DEPTH, MAX_ROW_CHARS, DatasetTask, dataset_task, load_dataset_task


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
    path = tmp_path / "data.txt"
    path.write_text("prompt,answer\nq,1\n")
    message = load_error(path)
    assert "unsupported" in message and ".txt" in message and ".csv" in message


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


def test_row_missing_answer_when_others_have_one(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "noanswer.jsonl", [{"prompt": "q"}] + numbered_rows(2))
    assert "line 1: missing 'answer' (other rows have one)" in load_error(path)


def test_parquet_row_missing_answer_names_row(tmp_path: Path) -> None:
    path = tmp_path / "gap.parquet"
    rows = numbered_rows(3)
    rows[1]["answer"] = None
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert "row 2: missing 'answer'" in load_error(path)


def test_row_with_empty_prompt(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "blank.jsonl", numbered_rows(1) + [{"prompt": "   ", "answer": "1"}])
    assert "line 2: empty prompt" in load_error(path)


def test_row_with_bad_prompt_or_answer(tmp_path: Path) -> None:
    number = write_jsonl(tmp_path / "number.jsonl", [{"prompt": 7, "answer": "1"}])
    assert "'prompt' must be text or a list of {role, content} messages, got int" in load_error(number)
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


# ----------------------------------------------------------------------------- formats and columns

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3="}]


def rich_rows(n: int = 6) -> list[dict]:
    """Rows with a text prompt, an answer and two extra columns a reward function would use."""
    return [{"prompt": f"{i}+{i}=", "answer": str(2 * i), "level": i % 3, "source": f"s{i}"} for i in range(n)]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def everything(task) -> list[Example]:
    return list(task.train) + list(task.test)


def by_prompt(task) -> dict:
    return {e.prompt if isinstance(e.prompt, str) else json.dumps(e.prompt): e for e in everything(task)}


def write_source(kind: str, folder: Path, rows: list[dict]):
    """The rows as a data source of the given kind: a file or save_to_disk folder path, a Dataset, a list."""
    if kind == "jsonl":
        return write_jsonl(folder / "d.jsonl", rows)
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), folder / "d.parquet")
        return folder / "d.parquet"
    if kind == "csv":
        return write_csv(folder / "d.csv", rows)
    if kind == "folder":
        datasets.Dataset.from_list(rows).save_to_disk(folder / "d")
        return folder / "d"
    return datasets.Dataset.from_list(rows) if kind == "dataset" else rows


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv", "folder", "dataset", "list"])
def test_every_format_loads_prompts_answers_and_extra_columns(tmp_path: Path, kind: str) -> None:
    rows = rich_rows()
    data = write_source(kind, tmp_path, rows)
    task = dataset_task(data, eval_fraction=0.0)
    assert len(task.train) == len(rows) and not task.test
    example = by_prompt(task)["3+3="]
    assert example.answer == "6"
    level = "0" if kind == "csv" else 0  # CSV cells stay text
    assert example.columns == {"answer": "6", "level": level, "source": "s3"}
    assert task.is_correct("\\boxed{6}", example)
    assert task.name == ("dataset" if kind in ("dataset", "list") else f"dataset:{Path(data).name}")


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "dataset"])
def test_conversation_prompts_load_as_messages(tmp_path: Path, kind: str) -> None:
    rows = [{"prompt": CHAT, "answer": "5", "topic": "sums"}, {"prompt": "7+1=", "answer": "8", "topic": "text"}]
    if kind == "jsonl":
        data = write_jsonl(tmp_path / "chat.jsonl", rows)
    elif kind == "parquet":  # Arrow cannot mix text and lists in one column: conversations only
        rows[1]["prompt"] = [{"role": "user", "content": "7+1="}]
        data = tmp_path / "chat.parquet"
        pq.write_table(pa.Table.from_pylist(rows), data)
    else:
        rows[1]["prompt"] = [{"role": "user", "content": "7+1="}]
        data = datasets.Dataset.from_list(rows)
    task = dataset_task(data, eval_fraction=0.0)
    first = next(e for e in task.train if e.answer == "5")
    assert first.prompt == CHAT
    assert first.columns == {"answer": "5", "topic": "sums"}


def test_arrow_struct_fields_missing_in_a_message_are_dropped() -> None:
    rows = [{"prompt": [{"role": "user", "content": "hi", "name": None}], "answer": "1"}]
    task = dataset_task(rows, eval_fraction=0.0)
    assert task.train[0].prompt == [{"role": "user", "content": "hi"}]


def test_question_column_is_the_prompt_and_prompt_wins(tmp_path: Path) -> None:
    task = dataset_task([{"question": "q1", "answer": "1", "extra": True}], eval_fraction=0.0)
    assert task.train[0].prompt == "q1" and task.train[0].columns == {"answer": "1", "extra": True}
    both = dataset_task([{"prompt": "p", "question": "q", "answer": "1"}], eval_fraction=0.0)
    assert both.train[0].prompt == "p" and both.train[0].columns == {"question": "q", "answer": "1"}


def test_rows_without_answers_have_no_accuracy(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "open.jsonl", [{"prompt": f"Write a haiku about {i}.", "style": "haiku"}
                                                for i in range(10)])
    task = load_dataset_task(path)
    assert len(task.train) == 9 and len(task.test) == 1  # the seeded 10% held-out split as before
    assert all(e.answer is None and e.columns == {"style": "haiku"} for e in everything(task))
    assert not task.is_correct("\\boxed{1}", task.train[0]) and task.reward("anything", task.train[0]) == 0.0


def test_example_source_names_the_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", numbered_rows(3))
    sources = sorted(e.source for e in everything(load_dataset_task(path, eval_fraction=0.0)))
    assert sources == [f"{path} line {i}" for i in (1, 2, 3)]
    assert dataset_task(numbered_rows(1)).train[0].source == "dataset row 1"


# ----------------------------------------------------------------------------- splits


def test_dataset_dict_folder_trains_on_train_and_holds_out_test(tmp_path: Path) -> None:
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rich_rows(6)),
                          "test": datasets.Dataset.from_list(numbered_rows(2))}).save_to_disk(folder)
    task = dataset_task(folder)
    assert [e.prompt for e in task.train] == [r["prompt"] for r in rich_rows(6)]
    assert [e.prompt for e in task.test] == [r["prompt"] for r in numbered_rows(2)]
    assert task.train[0].source == f"{folder} train row 1"


def test_dataset_split_picks_the_training_split(tmp_path: Path) -> None:
    dd = datasets.DatasetDict({"easy": datasets.Dataset.from_list(rich_rows(4)),
                               "hard": datasets.Dataset.from_list(numbered_rows(10)),
                               "validation": datasets.Dataset.from_list(numbered_rows(3))})
    task = build_task(dataset=dd, dataset_split="hard")
    assert len(task.train) == 10 and len(task.test) == 3  # validation is the held-out split
    with pytest.raises(DataError, match="has splits easy, hard, validation and none named train"):
        dataset_task(dd)
    with pytest.raises(DataError, match="has no split 'medium': its splits are easy, hard, validation"):
        dataset_task(dd, split="medium")
    only = datasets.DatasetDict({"data": datasets.Dataset.from_list(numbered_rows(10))})
    assert len(dataset_task(only).train) == 9  # the only split, a seeded sample held out


def test_dataset_split_selects_split_column_values(tmp_path: Path) -> None:
    rows = [dict(r, split=["train", "test", "extra"][i % 3]) for i, r in enumerate(numbered_rows(9))]
    task = load_dataset_task(write_jsonl(tmp_path / "s.jsonl", rows), split="extra")
    assert [e.prompt for e in task.train] == [rows[i]["prompt"] for i in (2, 5, 8)]
    assert [e.prompt for e in task.test] == [rows[i]["prompt"] for i in (1, 4, 7)]
    with pytest.raises(ConfigError, match="--dataset-split hard: .* has no splits"):
        load_dataset_task(write_jsonl(tmp_path / "plain.jsonl", numbered_rows(3)), split="hard")


def test_eval_dataset_holds_out_rows_from_another_source(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", numbered_rows(10))
    held = tmp_path / "held.csv"
    write_csv(held, [{"prompt": "held out?", "answer": "1"}])
    task = build_task(dataset=str(train), eval_dataset=str(held))
    assert len(task.train) == 10 and [e.prompt for e in task.test] == ["held out?"]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(numbered_rows(2)),
                               "test": datasets.Dataset.from_list(rich_rows(3))})
    assert len(dataset_task(numbered_rows(5), eval_data=dd).test) == 3
    with pytest.raises(ConfigError, match="go with --dataset"):
        build_task("arithmetic", eval_dataset=str(held))


# ----------------------------------------------------------------------------- bad data and limits


def test_folder_that_is_not_a_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    assert "is not a dataset folder written by datasets' save_to_disk" in load_error(folder)


def test_unknown_role_and_malformed_conversations(tmp_path: Path) -> None:
    cases = {"narrator": [{"role": "narrator", "content": "Once"}],
             "empty": [],
             "text content": [{"role": "user", "content": ["not", "text"]}],
             "not a message": ["hello"]}
    expected = {"narrator": "line 1: message 1 of the conversation has role 'narrator': roles are system, user, "
                            "assistant, tool",
                "empty": "line 1: empty conversation",
                "text content": "line 1: message 1 of the conversation (user) must have text 'content', got list",
                "not a message": "line 1: message 1 of the conversation must be a {role, content} object, got str"}
    for name, prompt in cases.items():
        path = write_jsonl(tmp_path / f"{name.replace(' ', '_')}.jsonl", [{"prompt": prompt, "answer": "1"}])
        assert expected[name] in load_error(path)


def test_other_objects_and_rows_are_refused() -> None:
    with pytest.raises(DataError, match="unsupported dataset of type int"):
        dataset_task(7)
    with pytest.raises(DataError, match="dataset row 2: expected a dict with a 'prompt', got str"):
        dataset_task([{"prompt": "a"}, "b"])
    with pytest.raises(DataError, match="^dataset has no rows$"):
        dataset_task([])
    with pytest.raises(DataError, match="^dataset has no rows$"):
        dataset_task(datasets.Dataset.from_list([]))


def test_csv_row_with_more_cells_than_columns(tmp_path: Path) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text("prompt,answer\nq,1\nr,2,3\n")
    assert "row 2: more cells than the header has columns" in load_error(path)


def deep_line(depth: int) -> str:
    """A JSON row whose `meta` column nests `depth` lists."""
    return '{"prompt": "1+1=", "answer": "2", "meta": ' + "[" * depth + "]" * depth + "}"


def test_deeply_nested_row_is_one_line_not_a_recursion_error(tmp_path: Path) -> None:
    line = deep_line(100_000)
    with pytest.raises(RecursionError):  # what the loader used to let through as a traceback
        json.loads(line)
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps(numbered_rows(1)[0]) + "\n" + line + "\n")
    assert f"line 2: nested deeper than {MAX_DEPTH} levels" in load_error(path)
    array = tmp_path / "deep.json"
    array.write_text("[" + line + "]")
    assert f"nested deeper than {MAX_DEPTH} levels" in load_error(array)


def test_depth_limit_counts_levels_and_covers_python_rows(tmp_path: Path) -> None:
    ok = write_jsonl(tmp_path / "ok.jsonl", [json.loads(deep_line(MAX_DEPTH - 1))])  # row 1 + 31 lists = 32
    assert len(load_dataset_task(ok, eval_fraction=0.0).train) == 1
    over = write_jsonl(tmp_path / "over.jsonl", [json.loads(deep_line(MAX_DEPTH))])
    assert f"line 1: nested deeper than {MAX_DEPTH} levels" in load_error(over)
    nested: list = []
    for _ in range(100_000):  # a Python row nested far deeper than any recursion limit
        nested = [nested]
    with pytest.raises(DataError, match=f"dataset row 1: nested deeper than {MAX_DEPTH} levels"):
        dataset_task([{"prompt": "q", "meta": nested}])


def test_oversized_rows_are_refused(tmp_path: Path) -> None:
    huge = "x" * (MAX_ROW_CHARS + 1)
    jsonl = write_jsonl(tmp_path / "big.jsonl", numbered_rows(1) + [{"prompt": huge, "answer": "1"}])
    assert "line 2: more than 1 MiB of text (the limit of a row)" in load_error(jsonl)
    parquet = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "answer": "1", "context": huge}]), parquet)
    assert "row 1: more than 1 MiB of text" in load_error(parquet)
    big_csv = write_csv(tmp_path / "big.csv", [{"prompt": huge, "answer": "1"}])
    assert "row 1: more than 1 MiB of text" in load_error(big_csv)
    at_limit = write_jsonl(tmp_path / "fits.jsonl", [{"prompt": "x" * (MAX_ROW_CHARS - 100)}])
    assert len(load_dataset_task(at_limit).train) == 1


# ----------------------------------------------------------------------------- through the CLI


def cli_error(capsys, argv: list) -> str:
    """Run the CLI in-process on bad input: exit status 2 and exactly one `sparselayer: error:` line."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, (code, captured.err)
    assert len(lines) == 1 and lines[0].startswith("sparselayer: error: "), lines
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def quick_train(model, out, *extra) -> list:
    return ["train", "--model", model, "--layers", "2", "--output-dir", out, "--max-steps", "1",
            "--prompts-per-step", "2", "--num-generations", "2", "--max-completion-length", "4", "--no-progress",
            "--no-eval-at-start", "--no-eval-at-end", "--rollout", "hf", *extra]


def test_bad_data_through_the_cli(capsys, tmp_path, tiny_model) -> None:
    deep = tmp_path / "deep.jsonl"
    deep.write_text(deep_line(100_000) + "\n")
    assert f"{deep} line 1: nested deeper than {MAX_DEPTH} levels" in cli_error(
        capsys, quick_train(tiny_model, tmp_path / "o1", "--dataset", deep))
    folder = tmp_path / "not-a-dataset"
    folder.mkdir()
    assert "is not a dataset folder" in cli_error(capsys, quick_train(tiny_model, tmp_path / "o2", "--dataset", folder))
    roles = write_jsonl(tmp_path / "roles.jsonl", [{"prompt": [{"role": "narrator", "content": "x"}]}])
    assert "line 1: message 1 of the conversation has role 'narrator'" in cli_error(
        capsys, quick_train(tiny_model, tmp_path / "o3", "--dataset", roles))
    plain = write_jsonl(tmp_path / "plain.jsonl", numbered_rows(4))
    assert "--dataset-split test: " in cli_error(
        capsys, quick_train(tiny_model, tmp_path / "o4", "--dataset", plain, "--dataset-split", "test"))
    assert "data file not found" in cli_error(
        capsys, quick_train(tiny_model, tmp_path / "o5", "--dataset", plain, "--eval-dataset", tmp_path / "nope.csv"))
    big = write_jsonl(tmp_path / "big.jsonl", [{"prompt": "x" * (2 * MAX_ROW_CHARS), "answer": "1"}])
    assert f"{big} line 1: more than 1 MiB of text" in cli_error(
        capsys, quick_train(tiny_model, tmp_path / "o6", "--dataset", big))
