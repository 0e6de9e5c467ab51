"""The GPU proof in one command: what only a CUDA GPU can show, measured and written under --out.

Stages, in the order they run; each runs in its own process under its own time limit, so a failure or an
overrun costs that stage alone and the others' figures still come back:

  environment   versions, device, memory (in this process)
  kernel_tests  the kernel test files on CUDA against their float64 references: fused GRPO loss (torch and
                Triton backends, every loss type, float32 and bfloat16), the FusedLMHeadGRPOLoss module,
                fused RMSNorm/SwiGLU
  fused_loss    benchmarks/bench_grpo_loss.py on tokens {1k, 8k, 32k} x vocabulary {32k, 152k}, hidden 4096,
                bfloat16: naive, fused (Triton), fused-torch and Liger-Kernel's LigerFusedLinearGRPOLoss
  step          `sparselayer bench step` at its default shape in bfloat16: full-parameter vs layer-sparse
  train         `sparselayer train --layer 16 --rollout hf` on the embedded model: accuracy before and after
  step_8b_nf4   `sparselayer bench step --preset qwen3-8b` (nf4 frozen layers), 8 prompts x 8 generations x
                1024 completion tokens: the sparse step's peak memory and time

It writes gpu_check.json (every figure, every target and whether it was met), gpu_check.md (the same as
tables), gpu_check.log (each stage's output) and the benchmarks' own JSON files, and exits 1 when a stage
failed. The targets: every kernel test passes; at 8k tokens x 152k vocabulary the fused loss is at least as
fast as naive and needs at most 10% of its peak memory; the 8B-shaped nf4 sparse step stays under 22 GiB.

    python benchmarks/gpu_check.py --fetch-wheels .whl    # here: the Python 3.12 wheels the GPU image lacks
    python3 benchmarks/gpu_check.py --wheels .whl --out $OUT    # there: <= 8 minutes on one H200
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check    # CPU, tiny shapes, Triton's interpreter

The dry run (in the test suite) runs every stage at tiny shapes on CPU with the packages the GPU image lacks
hidden from the children (vLLM, TRL, datasets, math-verify, the C++ extension), so the script cannot rot
while no GPU is at hand. benchmarks/README.md has the exact device command.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GiB, MiB = 2**30, 2**20
# What the GPU image lacks (Python 3.12 wheels travel beside the tree; pinned: one version of each)
WHEELS = ("bitsandbytes==0.50.2", "liger-kernel==0.8.5")
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                   "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "any")
# ... and what it lacks that the check must not need: the dry run hides these from every child
IMAGE_LACKS = ("vllm", "trl", "datasets", "math_verify", "flash_attn", "wandb", "trackio", "sparselayer._C")
KERNEL_TESTS = ("tests/test_grpo_loss_kernels.py", "tests/test_loss_module.py", "tests/test_norm_mlp_kernels.py")
PACKAGES = ("torch", "triton", "transformers", "bitsandbytes", "liger-kernel", "safetensors", "pytest-xdist")
TARGET_POINT = (8192, 151936)  # tokens x vocabulary of the fused-loss targets
MAX_FUSED_MEM_SHARE = 0.10
MAX_8B_PEAK_GIB = 22.0
REPORT_RESERVE_S = 15.0  # kept back from the budget for the report
MIN_STAGE_S = 20.0  # a stage with less time left than this is not started
DRY_RUN_SLACK = 5.0  # the dry run's stages get 5x their caps and keep nothing for later stages: a CPU shared with
# other jobs may run them several times slower, and only the budget (--budget-s) bounds the whole dry run


@dataclass
class Context:
    """Where the check writes, how the children run, and the time it has."""

    out: Path
    work: Path
    dry_run: bool
    env: dict[str, str]
    deadline: float
    log: Path

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"


@dataclass
class StageResult:
    """One stage's outcome: ok | failed | timed out | not run; its figures and the tail of its output."""

    name: str
    status: str
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    command: list[str] | None = None


@dataclass
class Stage:
    """A stage: its own time limit, the time kept for it while earlier stages run, the command it runs (None:
    runs in this process) and how its figures are read back from what the command wrote."""

    name: str
    cap_s: float
    reserve_s: float
    command: Callable[[Context], list[str]] | None
    read: Callable[[Context], dict[str, Any]]


# ---------------------------------------------------------------------------------------------- the stages


def python() -> list[str]:
    return [sys.executable, "-u"]


def kernel_tests_command(ctx: Context) -> list[str]:
    cmd = python() + ["-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS,
                      "--junitxml", str(ctx.work / "kernel_tests.xml")]
    if ctx.dry_run:  # a slice: the suite runs these files in full anyway
        return cmd + ["-k", "torch_matches_reference or triton_matches_reference or each_backend or swiglu_matches"]
    if importlib.util.find_spec("xdist") is not None:  # Triton compiles in parallel workers
        cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    return cmd


def read_kernel_tests(ctx: Context) -> dict[str, Any]:
    """Counts per file and the failing tests, from the JUnit XML pytest wrote."""
    root = ET.parse(ctx.work / "kernel_tests.xml").getroot()
    files: dict[str, dict[str, int]] = {}
    failing = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        file = case.get("classname", "").split(".")[-1]
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        outcome = {"failure": "failed", "error": "errors"}.get(outcome, outcome)
        counts = files.setdefault(file, {"passed": 0, "failed": 0, "errors": 0, "skipped": 0})
        counts[outcome] += 1
        if outcome in ("failed", "errors"):
            failing.append(name)
    total = {k: sum(c[k] for c in files.values()) for k in ("passed", "failed", "errors", "skipped")}
    return {**total, "files": files, "failing": failing[:40], "device": ctx.device,
            "triton": "interpreter" if ctx.dry_run else "compiled"}


def fused_loss_command(ctx: Context) -> list[str]:
    shape = (["--tokens", "256", "--vocab", "512", "--hidden", "32", "--reps", "1"] if ctx.dry_run else
             ["--tokens", "1024", "8192", "32768", "--vocab", "32768", "151936", "--hidden", "4096", "--reps", "3"])
    return python() + [str(ROOT / "benchmarks" / "bench_grpo_loss.py"), "--device", ctx.device, *shape, "--methods",
                       "naive", "fused", "fused-torch", "liger", "--output", str(ctx.out / "grpo_loss.json")]


def read_fused_loss(ctx: Context) -> dict[str, Any]:
    """The grid's rows and, at the target point, fused against naive (time and peak memory)."""
    data = json.loads((ctx.out / "grpo_loss.json").read_text())
    rows = data["results"]
    tokens, vocab = (256, 512) if ctx.dry_run else TARGET_POINT
    at = {r["method"]: r for r in rows if (r["tokens"], r["vocab"]) == (tokens, vocab)}
    naive = at.get("naive", {})
    figures: dict[str, Any] = {"target_point": [tokens, vocab], "table": data["table"], "points": len(rows)}
    for method, row in at.items():
        figures[f"{method}_time_s"] = row.get("time_s")
        figures[f"{method}_peak_extra_bytes"] = row.get("alloc_extra_bytes")
        if row.get("error"):
            figures[f"{method}_error"] = row["error"]
    for method, row in at.items():  # fused decides the targets; fused-torch and liger are there to compare
        if method != "naive" and naive.get("time_s") and row.get("time_s"):
            figures[f"naive_over_{method}_time"] = naive["time_s"] / row["time_s"]
        if method != "naive" and naive.get("alloc_extra_bytes") and row.get("alloc_extra_bytes") is not None:
            figures[f"{method}_mem_share_of_naive"] = row["alloc_extra_bytes"] / naive["alloc_extra_bytes"]
    return figures


TINY_STEP = ["--num-layers", "3", "--hidden", "32", "--intermediate", "64", "--vocab", "512", "--heads", "4",
             "--kv-heads", "2", "--layer", "1", "--prompts", "2", "--generations", "2", "--prompt-len", "8",
             "--completion-len", "8", "--micro-batch-size", "4", "--steps", "1", "--capture-engine", "none"]


def step_command(ctx: Context) -> list[str]:
    shape = TINY_STEP if ctx.dry_run else ["--steps", "2"]
    return python() + ["-m", "sparselayer", "bench", "step", "--device", ctx.device, "--dtype", "bfloat16", *shape,
                       "--output", str(ctx.out / "step.json")]


def read_step(ctx: Context) -> dict[str, Any]:
    """Each variant's step time and peak memory, and the ratios."""
    data = json.loads((ctx.out / "step.json").read_text())
    figures = {"speedup": data.get("speedup"), "peak_mem_ratio": data.get("peak_mem_ratio"),
               "device_name": data.get("device_name"), "dtype": "bfloat16"}
    for row in data["results"]:
        figures[f"{row['variant']}_step_time_s"] = row["step_time_s"]
        figures[f"{row['variant']}_peak_mem_bytes"] = row["peak_mem_bytes"]
    return figures


def step_8b_command(ctx: Context) -> list[str]:
    shape = TINY_STEP + ["--quant", "nf4", "--variants", "sparse"] if ctx.dry_run else [
        "--preset", "qwen3-8b", "--prompts", "8", "--generations", "8", "--completion-len", "1024", "--steps", "1"]
    return python() + ["-m", "sparselayer", "bench", "step", "--device", ctx.device, *shape,
                       "--output", str(ctx.out / "step_8b_nf4.json")]


def read_step_8b(ctx: Context) -> dict[str, Any]:
    """The sparse step's peak memory (GiB) and time at the 8B shape."""
    data = json.loads((ctx.out / "step_8b_nf4.json").read_text())
    row = next(r for r in data["results"] if r["variant"] == "sparse")
    cfg = data["config"]
    return {"peak_mem_bytes": row["peak_mem_bytes"], "peak_mem_gib": row["peak_mem_bytes"] / GiB,
            "step_time_s": row["step_time_s"], "tokens_per_s": row["tokens_per_s"], "quant": row["quant"],
            "shape": {k: cfg[k] for k in ("num_layers", "hidden", "vocab", "layer", "prompts", "generations",
                                          "prompt_len", "completion_len")}}


def train_command(ctx: Context) -> list[str]:
    extra = ["--max-steps", "2", "--num-eval", "64"] if ctx.dry_run else []
    return python() + ["-m", "sparselayer", "train", "--layer", "16", "--rollout", "hf", "--device", ctx.device,
                       *extra, "--output-dir", str(ctx.work / "train")]


def read_train(ctx: Context) -> dict[str, Any]:
    """Held-out accuracy before and after, and the training seconds, from the run's summary."""
    summary = json.loads((ctx.work / "train" / "summary.json").read_text())
    return {"base_accuracy": summary["base_accuracy"], "final_accuracy": summary["final_accuracy"],
            "steps": summary["steps"], "train_time_s": summary["train_time_s"]}


def read_environment(ctx: Context) -> dict[str, Any]:
    """Versions, the device and its memory (CUDA), the date."""
    import torch

    figures: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "python": platform.python_version(), "cpus": os.cpu_count(),
                               "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    for name in PACKAGES:
        try:
            figures[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            figures[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        figures.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                       total_memory_gib=props.total_memory / GiB, multiprocessors=props.multi_processor_count)
    else:
        figures["device_name"] = "cpu"
    return figures


STAGES = (  # name, cap, reserve (s): the caps add up to more than the budget, the reserves to less
    Stage("environment", 30, 0, None, read_environment),
    Stage("kernel_tests", 150, 60, kernel_tests_command, read_kernel_tests),
    Stage("fused_loss", 150, 60, fused_loss_command, read_fused_loss),
    Stage("step", 90, 40, step_command, read_step),
    Stage("train", 120, 50, train_command, read_train),
    Stage("step_8b_nf4", 240, 150, step_8b_command, read_step_8b),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


# ---------------------------------------------------------------------------------------------- running


def run_stage(stage: Stage, ctx: Context, kept_for_later: float = 0.0) -> StageResult:
    """Run one stage under min(its cap, the time left less what the later stages keep); its output goes to the
    log; read its figures (also those a stopped stage left)."""
    left = ctx.deadline - time.monotonic() - REPORT_RESERVE_S - kept_for_later
    if left < MIN_STAGE_S:
        return StageResult(stage.name, "not run", error=f"out of time ({max(left, 0):.0f} s left)")
    t0 = time.monotonic()
    command = stage.command(ctx) if stage.command else None
    status, error = "ok", None
    if command is not None:
        limit = min(stage.cap_s * (DRY_RUN_SLACK if ctx.dry_run else 1), left)
        code = run_logged(stage.name, command, ctx, timeout=limit)
        if code is None:
            status, error = "timed out", f"killed after {limit:.0f} s; " + log_tail(ctx.log)
        elif code != 0:
            status, error = "failed", f"exit {code}: " + log_tail(ctx.log)
    try:  # a stage stopped early may still have written part of its figures (the loss grid writes per point)
        figures = stage.read(ctx)
    except Exception as exc:  # noqa: BLE001 - a stage whose output cannot be read is a failed stage
        figures = {}
        if status == "ok":
            status, error = "failed", f"reading its output: {exc!r}"
    return StageResult(stage.name, status, time.monotonic() - t0, figures, error, command)


def run_logged(name: str, command: list[str], ctx: Context, timeout: float) -> int | None:
    """Run `command` in its own process group with output appended to the log; its exit code, or None when it
    ran past `timeout` (then the whole group is killed)."""
    with ctx.log.open("a") as log:
        log.write(f"\n===== {name}: {' '.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(command, cwd=ROOT, env=ctx.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.write(f"\n===== {name}: killed after {timeout:.0f} s\n")
            return None


def log_tail(log: Path, lines: int = 12) -> str:
    """The last lines of the log (the failing stage's)."""
    text = log.read_text(errors="replace").splitlines() if log.exists() else []
    return "\n".join(text[-lines:])


def child_env(work: Path, site: Path | None, dry_run: bool) -> dict[str, str]:
    """The children's environment: the carried wheels and the repository importable; in the dry run the
    image's missing packages hidden (a sitecustomize) and Triton's interpreter on."""
    paths = [str(site)] if site else []
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if dry_run:
        hide = work / "hide"
        hide.mkdir(exist_ok=True)
        (hide / "sitecustomize.py").write_text(HIDE_SOURCE.format(names=IMAGE_LACKS))
        paths.append(str(hide))
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", SPARSELAYER_AUTO_ROLLOUT="hf")
    env["PYTHONPATH"] = os.pathsep.join(paths + [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


HIDE_SOURCE = '''"""gpu_check --dry-run: the packages the GPU image lacks, hidden (import fails, find_spec is None)."""
import importlib
import os
import sys

for name in {names!r}:
    sys.modules[name] = None
here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
del sys.modules["sitecustomize"]
try:  # the interpreter's own sitecustomize, if it has one
    importlib.import_module("sitecustomize")
except ImportError:
    pass
'''


def install_wheels(folder: Path, site: Path) -> None:
    """pip-install every wheel in `folder` into `site` (no index, no dependencies: the image has them)."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"gpu_check: no wheels in {folder} (make them here with --fetch-wheels {folder})")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()


def fetch_wheels(folder: Path) -> int:
    """Download the pinned wheels for the GPU image's Python (3.12, manylinux x86_64) into `folder`."""
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *WHEELS], check=True)
    sizes = {w.name: w.stat().st_size for w in sorted(folder.glob("*.whl"))}
    print("\n".join(f"{size / MiB:8.1f} MiB  {name}" for name, size in sizes.items()))
    print(f"{sum(sizes.values()) / MiB:8.1f} MiB in all (the tree and its carried paths travel within 64 MiB)")
    return 0


# ---------------------------------------------------------------------------------------------- the report


def targets(results: dict[str, StageResult]) -> list[dict[str, Any]]:
    """Each target with the figure that decides it and whether it was met (None: its stage gave no figure)."""
    kt, fl, big = (results[n].figures if n in results else {} for n in ("kernel_tests", "fused_loss", "step_8b_nf4"))
    share, speed = fl.get("fused_mem_share_of_naive"), fl.get("naive_over_fused_time")
    tokens, vocab = fl.get("target_point", TARGET_POINT)
    point = f"{tokens // 1024}k x {round(vocab / 1000)}k" if tokens >= 1024 else f"{tokens} x {vocab}"
    passed = kt.get("passed")
    return [
        {"target": "every CUDA kernel test passes", "figure": None if passed is None else
         f"{passed} passed, {kt['failed']} failed, {kt['errors']} errors, {kt['skipped']} skipped",
         "met": None if passed is None else kt["failed"] == kt["errors"] == 0 and passed > 0},
        {"target": f"fused loss at {point} at least as fast as naive", "figure": speed and f"naive/fused {speed:.2f}x",
         "met": None if speed is None else speed >= 1.0},
        {"target": f"fused loss at {point} at most 10% of naive's peak memory",
         "figure": share and f"{share:.1%}", "met": None if share is None else share <= MAX_FUSED_MEM_SHARE},
        {"target": "8B-shaped nf4 sparse step under 22 GiB", "figure": big.get("peak_mem_gib") and
         f"{big['peak_mem_gib']:.2f} GiB", "met": None if "peak_mem_gib" not in big else
         big["peak_mem_gib"] < MAX_8B_PEAK_GIB},
    ]


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the run, the targets, then each stage's status and figures."""
    env = report["stages"].get("environment", {}).get("figures", {})
    out = [f"# GPU check{' (dry run)' if report['dry_run'] else ''}", "",
           f"- date: {env.get('date', '?')}; device: {env.get('device_name', '?')}; torch {env.get('torch')}, "
           f"triton {env.get('triton')}, transformers {env.get('transformers')}, bitsandbytes "
           f"{env.get('bitsandbytes')}, liger-kernel {env.get('liger-kernel')}; Python {env.get('python')}",
           f"- command: `{report['command']}`; {report['seconds']:.0f} s in all", "",
           "| target | figure | met |", "| --- | --- | --- |"]
    out += [f"| {t['target']} | {t['figure'] or '-'} | {'-' if t['met'] is None else 'yes' if t['met'] else 'NO'} |"
            for t in report["targets"]]
    for name, stage in report["stages"].items():
        out += ["", f"## {name}: {stage['status']} ({stage['seconds']:.0f} s)", ""]
        if stage.get("error"):
            out += ["```", stage["error"], "```", ""]
        figures = dict(stage.get("figures", {}))
        table = figures.pop("table", None)
        out += [f"- {key}: {_fmt(value)}" for key, value in figures.items()]
        if table:
            out += ["", table]
    return "\n".join(out) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


# ---------------------------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="folder for gpu_check.json, gpu_check.md, gpu_check.log and the "
                                            "benchmarks' JSON (on the GPU machine: $OUT)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton's interpreter, the GPU "
                                                          "image's missing packages hidden")
    p.add_argument("--wheels", type=Path, help="install the wheels in this folder first (the GPU machine: .whl)")
    p.add_argument("--fetch-wheels", type=Path, metavar="FOLDER",
                   help="download the wheels the GPU image lacks into FOLDER and exit")
    p.add_argument("--budget-s", type=float, default=480.0, help="seconds for the whole check (default 480)")
    p.add_argument("--stages", default=",".join(STAGE_NAMES),
                   help=f"comma list of stages to run (default all: {','.join(STAGE_NAMES)})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels(args.fetch_wheels)
    if args.out is None:
        print("gpu_check: --out FOLDER is required (or --fetch-wheels FOLDER)", file=sys.stderr)
        return 2
    chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(STAGE_NAMES))
    if unknown or not chosen:
        print(f"gpu_check: unknown stage(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(STAGE_NAMES)}",
              file=sys.stderr)
        return 2
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    site = None
    if args.wheels:
        site = work / "site"
        install_wheels(args.wheels, site)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; use --dry-run on a machine without a GPU", file=sys.stderr)
            return 2
    ctx = Context(args.out, work, args.dry_run, child_env(work, site, args.dry_run), start + args.budget_s,
                  args.out / "gpu_check.log")
    ctx.log.write_text("")
    results: dict[str, StageResult] = {}
    stages = [s for s in STAGES if s.name in chosen]
    for i, stage in enumerate(stages):
        kept = 0.0 if args.dry_run else sum(later.reserve_s for later in stages[i + 1:])
        r = results[stage.name] = run_stage(stage, ctx, kept)
        print(f"[gpu_check] {r.name}: {r.status} in {r.seconds:.0f} s", flush=True)
    report = {"dry_run": args.dry_run, "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "seconds": time.monotonic() - start, "budget_s": args.budget_s,
              "stages": {name: vars(r) for name, r in results.items()}, "targets": targets(results)}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    (args.out / "gpu_check.md").write_text(text)
    print(text)
    return 0 if all(r.status == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
