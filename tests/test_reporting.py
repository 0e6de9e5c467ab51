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
