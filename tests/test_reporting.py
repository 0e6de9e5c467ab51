"""--report-to backends through their own libraries: TensorBoard event files that TensorBoard's own reader
loads with the metrics.jsonl keys, a Weights & Biases run folder in offline mode, and one-line errors."""
from __future__ import annotations

import math

import pytest

from sparselayer.errors import ConfigError
from sparselayer.reporting import build_reporters, check_reporters, scalars

METRICS = [{"step": s, "reward_mean": 0.1 * s, "rewards/accuracy/mean": 0.5, "skipped_steps": 0,
            "layers": "layer2", "loss": math.nan} for s in (1, 2, 3)]


def test_scalars_keep_numbers_only():
    assert scalars(METRICS[0]) == {"step": 1.0, "reward_mean": 0.1, "rewards/accuracy/mean": 0.5,
                                   "skipped_steps": 0.0, "loss": pytest.approx(math.nan, nan_ok=True)}


def test_tensorboard_event_files_load_in_tensorboards_reader(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reporters = build_reporters(["tensorboard"], tmp_path, {"model": {"layers": "2"}, "rl": {"beta": 0.0}})
    for m in METRICS:
        reporters.log(m, m["step"])
    reporters.log_table("completions", [{"prompt": "1+1=", "completion": "2|x", "reward": 1.0}], 2)
    reporters.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"reward_mean", "rewards/accuracy/mean", "skipped_steps"} <= tags and "layers" not in tags
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("reward_mean")] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert {"completions", "config"} <= {t.split("/")[0] for t in acc.Tags()["tensors"]}


def test_wandb_offline_writes_a_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    reporters = build_reporters(["wandb"], run_dir, {"rl": {"beta": 0.0}})
    for m in METRICS:
        reporters.log(m, m["step"])
    reporters.log_table("completions", [{"prompt": "1+1=", "completion": "2", "reward": 1.0}], 3)
    reporters.close()
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), runs


def test_none_and_duplicates_are_dropped():
    assert check_reporters(["none"]) == [] and check_reporters(None) == []
    assert check_reporters(["tensorboard", "tensorboard", "none"]) == ["tensorboard"]


def test_unknown_reporter_is_one_line():
    with pytest.raises(ConfigError, match="^--report-to must be one of"):
        check_reporters(["mlflow"])


def test_missing_library_names_the_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    with pytest.raises(ConfigError, match="needs the trackio package"):
        check_reporters(["trackio"])


def test_a_run_reports_to_tensorboard_and_wandb_with_completions_and_eval_curve(tmp_path, monkeypatch, capsys):
    """The whole CLI on the embedded model: every logger gets the metrics.jsonl keys, completions.jsonl holds
    each sampled group with its rewards, held-out accuracy every step, and the summary's best point."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sparselayer.cli import main
    from sparselayer.runs import RunDir

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    code = main(["train", "--output-dir", str(out), "--max-steps", "3", "--prompts-per-step", "3",
                 "--num-generations", "2", "--num-eval", "4", "--no-progress", "--rollout", "hf",
                 "--report-to", "tensorboard", "wandb", "--log-completions", "2", "--eval-steps", "1"])
    printed = capsys.readouterr().out
    assert code == 0
    run = RunDir(out)
    metrics, summary = run.read_metrics(), run.read_summary()
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert "eval_accuracy" in metrics[0] and "eval_accuracy" in metrics[1]  # step 3: the final evaluation
    curve = summary["eval_curve"]
    assert [p["step"] for p in curve] == [0, 1, 2, 3] and curve[-1]["accuracy"] == summary["final_accuracy"]
    best = max(p["accuracy"] for p in curve)
    assert summary["best_eval"]["accuracy"] == best
    assert f"best held-out accuracy {best:.1%} at step {summary['best_eval']['step']}" in printed

    rows = [json.loads(line) for line in run.completions_path.read_text().splitlines()]
    assert len(rows) == 2 * 2 and {r["step"] for r in rows} == {2}  # two prompts x their group, at step 2
    assert all(isinstance(r["completion"], str) and "rewards/task" in r for r in rows)
    assert sum(r["reward"] for r in rows) / 4 <= 1.0 and all(r["reward"] == r["rewards/task"] for r in rows)

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    numeric = {k for m in metrics for k, v in m.items() if isinstance(v, (int, float))}
    assert numeric <= tags, numeric - tags
    assert [round(e.value, 6) for e in acc.Scalars("reward_mean")] == [round(m["reward_mean"], 6) for m in metrics]
    assert [e.step for e in acc.Scalars("eval_accuracy")] == [0, 1, 2, 3]
    assert list((out / "wandb").glob("offline-run-*/*.wandb"))
