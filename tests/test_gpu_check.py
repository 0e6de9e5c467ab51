"""benchmarks/gpu_check.py: its dry run end to end (every stage at tiny shapes on CPU, the GPU image's missing
packages hidden), and the parts that keep a real GPU run's figures safe: stage failures and overruns recorded
without stopping the others, the targets, one-line errors."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


gpu_check = load_benchmark("gpu_check")


def _context(tmp_path: Path, budget_s: float = 600.0):
    work = tmp_path / "work"
    work.mkdir(parents=True)
    return gpu_check.Context(tmp_path, work, True, gpu_check.child_env(work, None, True),
                             time.monotonic() + budget_s, tmp_path / "gpu_check.log")


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_reports_every_figure(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--budget-s", "1200"],
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    stages = report["stages"]
    assert list(stages) == list(gpu_check.STAGE_NAMES)
    assert all(s["status"] == "ok" for s in stages.values()), {k: s["error"] for k, s in stages.items()}
    kernel = stages["kernel_tests"]["figures"]
    assert kernel["passed"] > 0 and kernel["failed"] == kernel["errors"] == 0 and kernel["triton"] == "interpreter"
    assert set(kernel["files"]) == {Path(f).stem for f in gpu_check.KERNEL_TESTS}
    loss = stages["fused_loss"]["figures"]
    assert loss["naive_time_s"] > 0 and loss["fused_time_s"] > 0 and loss["fused-torch_time_s"] > 0
    assert 0 < loss["fused_mem_share_of_naive"] and loss["naive_over_fused_time"] > 0
    assert loss["naive_over_fused-torch_time"] > 0
    assert ("naive_over_liger_time" in loss) == (importlib.util.find_spec("liger_kernel") is not None)
    step = stages["step"]["figures"]
    assert step["speedup"] > 0 and step["peak_mem_ratio"] > 0 and step["sparse_peak_mem_bytes"] > 0
    train = stages["train"]["figures"]
    assert 0 <= train["base_accuracy"] <= 1 and 0 <= train["final_accuracy"] <= 1 and train["steps"] == 2
    big = stages["step_8b_nf4"]["figures"]
    assert big["quant"] == "nf4" and big["peak_mem_gib"] > 0 and big["step_time_s"] > 0
    assert [t["met"] is not None for t in report["targets"]] == [True] * 4
    text = (out / "gpu_check.md").read_text()
    assert all(f"## {name}: ok" in text for name in gpu_check.STAGE_NAMES)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check.json", "gpu_check.log", "gpu_check.md", "grpo_loss.json", "step.json",
                     "step_8b_nf4.json"]  # the device tool returns at most 8 files


def test_dry_run_children_lack_what_the_gpu_image_lacks(tmp_path):
    ctx = _context(tmp_path)
    code = ("import importlib.util, sparselayer.packing as p; "
            "print([importlib.util.find_spec(n) is None for n in ('vllm', 'trl', 'datasets', 'math_verify')], "
            "p.HAVE_EXTENSION)")
    done = subprocess.run([sys.executable, "-c", code], env=ctx.env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[True, True, True, True] False"


def test_a_failing_stage_is_recorded_and_the_next_one_still_runs(tmp_path):
    ctx = _context(tmp_path)
    ctx.log.write_text("")
    bad = gpu_check.Stage("bad", 60, 0, lambda c: [sys.executable, "-c", "print('about to fail'); raise SystemExit(3)"],
                          lambda c: {})
    good = gpu_check.Stage("good", 60, 0, lambda c: [sys.executable, "-c", "print('fine')"], lambda c: {"x": 1})
    first, second = gpu_check.run_stage(bad, ctx), gpu_check.run_stage(good, ctx)
    assert first.status == "failed" and "exit 3" in first.error and "about to fail" in first.error
    assert second.status == "ok" and second.figures == {"x": 1}
    unreadable = gpu_check.Stage("unreadable", 60, 0, lambda c: [sys.executable, "-c", "pass"],
                                 lambda c: json.loads((c.out / "missing.json").read_text()))
    assert gpu_check.run_stage(unreadable, ctx).status == "failed"


def test_an_overrunning_stage_is_killed_with_its_children(tmp_path):
    ctx = _context(tmp_path)
    ctx.log.write_text("")
    marker = tmp_path / "grandchild_survived"
    grandchild = tmp_path / "grandchild.py"
    grandchild.write_text(f"import pathlib, time\ntime.sleep(8)\npathlib.Path({str(marker)!r}).touch()\n")
    parent = tmp_path / "parent.py"
    parent.write_text(f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, {str(grandchild)!r}])\n"
                      "time.sleep(120)\n")
    ctx.dry_run = False  # the real caps
    slow = gpu_check.Stage("slow", 3, 0, lambda c: [sys.executable, str(parent)], lambda c: {})
    result = gpu_check.run_stage(slow, ctx)
    assert result.status == "timed out" and "killed after 3 s" in result.error
    time.sleep(9)  # a surviving grandchild would have written its marker by now
    assert not marker.exists()


def test_no_stage_starts_without_time_for_it(tmp_path):
    ctx = _context(tmp_path, budget_s=gpu_check.REPORT_RESERVE_S + 1)
    stage = gpu_check.Stage("late", 60, 0, lambda c: [sys.executable, "-c", "pass"], lambda c: {})
    result = gpu_check.run_stage(stage, ctx)
    assert result.status == "not run" and "out of time" in result.error
    roomy = _context(tmp_path / "roomy", budget_s=300)
    assert gpu_check.run_stage(stage, roomy, kept_for_later=290).status == "not run"  # kept for later stages
    assert gpu_check.run_stage(stage, roomy, kept_for_later=100).status == "ok"


def test_targets_read_the_figures():
    R = gpu_check.StageResult
    results = {"kernel_tests": R("kernel_tests", "ok", figures={"passed": 10, "failed": 0, "errors": 0, "skipped": 1}),
               "fused_loss": R("fused_loss", "ok", figures={"naive_over_fused_time": 0.8,
                                                            "fused_mem_share_of_naive": 0.04}),
               "step_8b_nf4": R("step_8b_nf4", "ok", figures={"peak_mem_gib": 23.5})}
    met = [t["met"] for t in gpu_check.targets(results)]
    assert met == [True, False, True, False]
    results["kernel_tests"].figures["failed"] = 1
    assert gpu_check.targets(results)[0]["met"] is False
    assert [t["met"] for t in gpu_check.targets({})] == [None] * 4  # no figure: not decided either way


@pytest.mark.parametrize("argv,message", [
    (["--dry-run"], "--out FOLDER is required"),
    (["--dry-run", "--out", "{tmp}", "--stages", "nope"], "unknown stage(s) nope"),
    (["--out", "{tmp}"], "no CUDA device here"),
])
def test_bad_invocations_get_one_line(tmp_path, argv, message):
    if "no CUDA" in message and _cuda():
        pytest.skip("this host has CUDA")
    argv = [a.replace("{tmp}", str(tmp_path / "o")) for a in argv]
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_a_stopped_stage_keeps_the_figures_it_wrote(tmp_path):
    ctx = _context(tmp_path)
    ctx.dry_run = False  # the real caps
    ctx.log.write_text("")
    (tmp_path / "part.json").write_text(json.dumps({"points": 1}))  # what the stage wrote before it was stopped
    stage = gpu_check.Stage("partial", 2, 0, lambda c: [sys.executable, "-c", "import time; time.sleep(120)"],
                            lambda c: json.loads((c.out / "part.json").read_text()))
    result = gpu_check.run_stage(stage, ctx)
    assert result.status == "timed out" and result.figures == {"points": 1}


def test_the_dry_run_gives_its_stages_slack(tmp_path):
    ctx = _context(tmp_path)
    ctx.log.write_text("")
    stage = gpu_check.Stage("slow_on_a_busy_cpu", 1, 0, lambda c: [sys.executable, "-c", "import time; time.sleep(2)"],
                            lambda c: {})
    assert gpu_check.run_stage(stage, ctx).status == "ok"  # 2 s against a cap of 1 s x DRY_RUN_SLACK
