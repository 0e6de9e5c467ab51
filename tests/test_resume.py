"""A run killed with SIGKILL and restarted with --resume ends with the same weights as an uninterrupted one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sparselayer.errors import RunError
from sparselayer.runs import RunDir

STEPS = 8


def _cmd(model: Path, out: Path, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "sparselayer.cli", "train", "--model", str(model), "--layer", "1",
           "--max-steps", str(STEPS), "--save-steps", "1", "--prompts-per-step", "4", "--num-generations", "4",
           "--micro-batch-size", "5", "--learning-rate", "0.01", "--beta", "0.04", "--num-iterations", "2",
           "--max-completion-length", "12", "--seed", "5", "--num-eval", "4", "--no-progress",
           "--output-dir", str(out)]
    return cmd + ["--resume"] if resume else cmd


def _final_weights(out: Path):
    ckpt = RunDir(out).latest_checkpoint()
    assert ckpt is not None and ckpt.name == f"step-{STEPS}"
    return load_file(str(ckpt / "trained.safetensors"))


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tiny_model, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(_cmd(tiny_model, straight))

    proc = subprocess.Popen(_cmd(tiny_model, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = RunDir(killed)
    assert run.checkpoint_steps() and run.checkpoint_steps()[-1] < STEPS
    assert (killed / ".lock").read_text().strip() == str(proc.pid), "the killed run's stale lock file"

    _run(_cmd(tiny_model, killed, resume=True))  # the kernel dropped the dead process's flock: taken over
    assert not list(run.checkpoints.glob(".tmp-*"))
    assert not (killed / ".lock").exists()
    a, b = _final_weights(straight), _final_weights(killed)
    assert a.keys() == b.keys() and all(k.startswith("model.layers.1.") for k in a)
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-6, name
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), "metrics.jsonl holds each step exactly once"


def test_summary_round_trip_and_bad_summary(tmp_path):
    """RunDir owns summary.json: {} before the first write, an atomic replace after, a RunError when corrupt."""
    run = RunDir(tmp_path / "run")
    assert run.read_summary() == {}
    run.write_summary({"steps": 3, "base_accuracy": 0.25})
    run.write_summary({"steps": 4, "base_accuracy": 0.25, "final_accuracy": 0.5})
    assert run.read_summary() == {"steps": 4, "base_accuracy": 0.25, "final_accuracy": 0.5}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4
    assert not [p for p in run.path.iterdir() if p.name != "summary.json"]  # no temporary file left
    run.summary_path.write_text("{not json")
    with pytest.raises(RunError, match="not valid JSON"):
        run.read_summary()
    run.summary_path.write_text("[1, 2]")
    with pytest.raises(RunError, match="JSON object"):
        run.read_summary()
