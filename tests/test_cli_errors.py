"""Bad input through the real CLI: a non-zero exit and one `sparselayer: error:` line, never a traceback."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sparselayer.cli import main
from sparselayer.config import TrainConfig
from sparselayer.runs import RunDir

# Small enough that a case which does reach training finishes in a second or two on CPU.
FAST = ["--max-steps", "1", "--prompts-per-step", "2", "--num-generations", "2", "--num-eval", "2",
        "--no-eval-at-start", "--no-eval-at-end", "--no-progress"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Run every case from tmp_path so a default `runs/...` output dir could never land in the repository."""
    monkeypatch.chdir(tmp_path)


def run_cli(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; check the one-line error contract and return that line."""
    capsys.readouterr()  # drop anything printed by fixtures
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code != 0, f"expected a failure for {argv}, got exit 0; stdout: {captured.out!r}"
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one stderr line, got {lines!r}"
    line = lines[0]
    assert line.startswith("sparselayer: error:"), line
    assert line[len("sparselayer: error:"):].strip(), "the error line carries no message"
    return line


def train_args(model, out, *extra) -> list[str]:
    return ["train", "--model", model, "--output-dir", out, *FAST, *extra]


def assert_fragment(line: str, *fragments: str) -> None:
    for fragment in fragments:
        assert fragment.lower() in line.lower(), f"{fragment!r} not in {line!r}"


# ----------------------------------------------------------------------------- model folder


def test_missing_model_path(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    line = run_cli(capsys, train_args(missing, tmp_path / "out"))
    assert_fragment(line, "does not exist", str(missing))
    assert not (tmp_path / "out").exists()


def test_folder_without_config_json(capsys, tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "README.md").write_text("hello\n")
    line = run_cli(capsys, train_args(folder, tmp_path / "out"))
    assert_fragment(line, "config.json", str(folder))


def test_unsupported_model_type(capsys, tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    line = run_cli(capsys, train_args(folder, tmp_path / "out"))
    assert_fragment(line, "unsupported architecture", "bert", "qwen3")


def test_config_json_not_json(capsys, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen3",')
    line = run_cli(capsys, train_args(folder, tmp_path / "out"))
    assert_fragment(line, "config.json", "not valid JSON")


def test_qwen3_folder_without_safetensors(capsys, tmp_path, tiny_model):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    for f in tiny_model.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, folder / f.name)
    assert (folder / "config.json").is_file() and not list(folder.glob("*.safetensors"))
    line = run_cli(capsys, train_args(folder, tmp_path / "out"))
    assert_fragment(line, ".safetensors")


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize("layer", ["99", "-5"])
def test_layer_out_of_range(capsys, tmp_path, tiny_model, layer):
    line = run_cli(capsys, train_args(tiny_model, tmp_path / "out", "--layer", layer))
    assert_fragment(line, f"layer {layer}", "out of range", "4 decoder layers")
    assert not (tmp_path / "out").exists(), "a rejected run must not create its output dir"


@pytest.mark.parametrize("spec", ["3-1", "abc"])
def test_malformed_layers(capsys, tmp_path, tiny_model, spec):
    line = run_cli(capsys, train_args(tiny_model, tmp_path / "out", "--layers", spec))
    assert_fragment(line, "--layers", spec, "not a layer list")


def _copy_with_config(tiny_model, folder, **changes):
    import json
    import shutil

    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    config.pop("layer_types", None)  # a per-layer list that would otherwise disagree with the new depth
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_config_declaring_layers_the_weights_lack(capsys, tmp_path, tiny_model):
    """Used to train and evaluate on two randomly initialised layers, silently."""
    folder = _copy_with_config(tiny_model, tmp_path / "deeper", num_hidden_layers=6)
    line = run_cli(capsys, train_args(folder, tmp_path / "out", "--layer", "1"))
    assert_fragment(line, "lack decoder layers 4-5", "config.json")
    line = run_cli(capsys, ["eval", folder, "--num-eval", "2", "--k", "0"])
    assert_fragment(line, "lack decoder layers 4-5")


def test_weights_whose_shapes_differ_from_config(capsys, tmp_path, tiny_model):
    folder = _copy_with_config(tiny_model, tmp_path / "wider", intermediate_size=72)
    line = run_cli(capsys, train_args(folder, tmp_path / "out", "--layer", "1"))
    assert_fragment(line, "has shape", "config.json implies")
    assert "Traceback" not in line and "report" not in line


def test_layer_and_layers_together(capsys, tmp_path, tiny_model):
    line = run_cli(capsys, train_args(tiny_model, tmp_path / "out", "--layer", "1", "--layers", "2"))
    assert_fragment(line, "--layer and --layers conflict")


# ----------------------------------------------------------------------------- data


def test_dataset_and_task_together(capsys, tmp_path, tiny_model):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    line = run_cli(capsys, train_args(tiny_model, tmp_path / "out", "--dataset", data, "--task", "arithmetic"))
    assert_fragment(line, "--dataset and --task are exclusive")


@pytest.mark.parametrize("flag, name, content, fragments", [
    ("--dataset", "empty.jsonl", "\n  \n", ("{path}", "empty")),
    ("--dataset", "bad.jsonl", '{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": \n',
     ("line 2", "malformed JSON")),
    ("--config", "bad.yaml", "learning_rate: [0.1\nmax_steps: : 3\n", ("{path}", "not valid YAML")),
    ("--config", "unknown.yaml", "learning_rate: 0.001\nlearning_rat: 0.5\n", ("unknown setting", "learning_rat")),
])
def test_bad_file_content(capsys, tmp_path, tiny_model, flag, name, content, fragments):
    """An empty or malformed dataset, invalid YAML, an unknown setting: one line naming the problem."""
    path = tmp_path / name
    path.write_text(content)
    line = run_cli(capsys, train_args(tiny_model, tmp_path / "out", flag, path))
    assert_fragment(line, *(f.format(path=path) for f in fragments))


def test_jsonl_row_missing_answer(capsys, tmp_path, tiny_model):
    data = tmp_path / "noanswer.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n')
    line = run_cli(capsys, train_args(tiny_model, tmp_path / "out", "--dataset", data))
    assert_fragment(line, "line 2", "missing 'answer'")


# ----------------------------------------------------------------------------- reward functions


def test_reward_spec_without_colon(capsys, tmp_path, tiny_model):
    line = run_cli(capsys, train_args(tiny_model, tmp_path / "out", "--reward", "just_a_module"))
    assert_fragment(line, "just_a_module", "module:function")


def test_reward_module_not_found(capsys, tmp_path, tiny_model):
    spec = "sparselayer_no_such_reward_module:score"
    line = run_cli(capsys, train_args(tiny_model, tmp_path / "out", "--reward", spec))
    assert_fragment(line, spec, "not found")


def _raising_reward(tmp_path: Path) -> str:
    reward = tmp_path / "bad_reward.py"
    reward.write_text("def score(prompts, completions, answer, **kwargs):\n"
                      "    raise ZeroDivisionError('reward exploded\\nsecond line of the message')\n")
    return f"{reward}:score"


def test_reward_function_raises(capsys, tmp_path, tiny_model):
    reward = _raising_reward(tmp_path)
    line = run_cli(capsys, train_args(tiny_model, tmp_path / "out", "--layer", "1", "--reward", reward))
    assert_fragment(line, "bad_reward.py:score", "ZeroDivisionError", "reward exploded")
    assert "second line" not in line


def test_reward_failure_leaves_no_partial_checkpoint(capsys, tmp_path, tiny_model):
    out = tmp_path / "out"
    reward = _raising_reward(tmp_path)
    run_cli(capsys, train_args(tiny_model, out, "--layer", "1", "--reward", reward, "--save-steps", "1"))
    ckpts = out / "checkpoints"
    assert ckpts.is_dir(), "the run directory is created before the first step"
    entries = list(ckpts.iterdir())
    assert not [e for e in entries if e.name.startswith(".tmp-")], entries
    for entry in entries:  # only complete step-N folders may exist (none is expected: step 1 failed)
        assert entry.is_dir() and entry.name.startswith("step-") and entry.name[5:].isdigit(), entry
        assert {"trained.safetensors", "state.pt", "meta.json"} <= {f.name for f in entry.iterdir()}, entry
    assert RunDir(out).latest_checkpoint() is None
    # nothing half-written anywhere in the run directory (atomic writes leave hidden temp files on failure)
    assert not [p for p in out.rglob(".*")], list(out.rglob(".*"))
    assert RunDir(out).read_metrics() == []


# ----------------------------------------------------------------------------- flag values


@pytest.mark.parametrize("argv, fragments", [
    (["--learning-rate", "abc"], ["learning_rate", "float", "abc"]),
    (["--loss-type", "nope"], ["--loss-type", "nope", "dapo"]),
    (["--num-generations", "1"], ["--num-generations", "at least 2"]),
    (["--scale-rewards", "maybe"], ["--scale-rewards", "maybe", "group"]),
])
def test_bad_flag_values(capsys, tmp_path, tiny_model, argv, fragments):
    line = run_cli(capsys, train_args(tiny_model, tmp_path / "out", *argv))
    assert_fragment(line, *fragments)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- --config files


def test_config_file_missing(capsys, tmp_path, tiny_model):
    missing = tmp_path / "nope.yaml"
    line = run_cli(capsys, train_args(tiny_model, tmp_path / "out", "--config", missing))
    assert_fragment(line, "config file not found", str(missing))


# ----------------------------------------------------------------------------- run directories


def test_resume_without_output_dir(capsys, tiny_model):
    line = run_cli(capsys, ["train", "--model", tiny_model, *FAST, "--resume"])
    assert_fragment(line, "--resume", "--output-dir")


def test_output_dir_already_holds_run(capsys, tmp_path, tiny_model):
    out = tmp_path / "out"
    run = RunDir(out).create()
    run.write_config(TrainConfig().to_dict())
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    line = run_cli(capsys, train_args(tiny_model, out))
    assert_fragment(line, "already holds a run", "--resume")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before, "the existing run must be left untouched"


def test_eval_missing_path(capsys, tmp_path):
    missing = tmp_path / "missing" / "path"
    line = run_cli(capsys, ["eval", missing, "--num-eval", "2", "--k", "0"])
    assert_fragment(line, "does not exist", str(missing))


def test_export_not_a_run_dir(capsys, tmp_path, tiny_model):
    exported = tmp_path / "exported"
    line = run_cli(capsys, ["export", tiny_model, "--output", exported])
    assert_fragment(line, "not a sparselayer run directory", str(tiny_model))
    assert not exported.exists()


# ----------------------------------------------------------------------------- regressions found by review


def _copy_model(tiny_model, dest: Path) -> Path:
    shutil.copytree(tiny_model, dest)
    return dest


def test_config_json_that_is_not_an_object(capsys, tmp_path, tiny_model):
    folder = _copy_model(tiny_model, tmp_path / "m")
    (folder / "config.json").write_text("[1, 2]")
    assert_fragment(run_cli(capsys, train_args(folder, tmp_path / "out")), "JSON object")


def test_model_without_tokenizer(capsys, tmp_path, tiny_model):
    folder = _copy_model(tiny_model, tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    assert_fragment(run_cli(capsys, train_args(folder, tmp_path / "out")), "no tokenizer")
    assert not (tmp_path / "out").exists()


def test_corrupt_safetensors(capsys, tmp_path, tiny_model):
    folder = _copy_model(tiny_model, tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    assert_fragment(run_cli(capsys, train_args(folder, tmp_path / "out", "--layer", "1")), "could not load model")


def test_run_dir_with_invalid_config_yaml(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: [unclosed\n")
    assert_fragment(run_cli(capsys, ["export", run, "--output", tmp_path / "x"]), "not valid YAML")


@pytest.mark.parametrize("flags,fragment", [
    (["--max-completion-length", "0"], "max-completion-length"),
    (["--learning-rate", "inf"], "finite"),
    (["--beta", "nan"], "finite"),
])
def test_out_of_range_numbers(capsys, tmp_path, tiny_model, flags, fragment):
    assert_fragment(run_cli(capsys, train_args(tiny_model, tmp_path / "out", *flags)), fragment)


def test_setting_in_the_wrong_yaml_section(capsys, tmp_path, tiny_model):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rl:\n  model: foo\n")
    assert_fragment(run_cli(capsys, ["train", "--config", cfg]), "does not belong")
