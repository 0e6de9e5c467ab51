"""The run directory under hostile conditions (issue 12, item 3): a crafted state.pt, two processes on
one folder, truncated checkpoint files, a full disk, directory fsyncs, weights_only optimizer state.

Each case reproduces a failure of the earlier code: a pickled payload ran on eval/export/--resume, a
second `train` wrote into a running one, a truncated file gave a traceback or stopped a resume that
could have used the previous checkpoint, a full disk gave a C++ enforce message.
"""
from __future__ import annotations

import errno
import json
import os
import random
import resource
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes

from sparselayer.cli import main
from sparselayer.config import TrainConfig
from sparselayer.optim import build_optimizer
from sparselayer.runs import RunDir, atomic_write_text, python_rng_state
from sparselayer.train import train

STEPS = 3
CHILD_ENV = {**os.environ, "SPARSELAYER_AUTO_ROLLOUT": "hf", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Run every case from tmp_path so a default `runs/...` folder could never land in the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def base_run(tiny_model, tmp_path_factory) -> Path:
    """A finished 3-step run of layer 1 with a checkpoint at every step (step-1, step-2, step-3)."""
    out = tmp_path_factory.mktemp("base") / "run"
    config = TrainConfig.from_mapping({
        "model": str(tiny_model), "layers": "1", "rollout": "hf", "max_steps": STEPS, "save_steps": 1,
        "save_total_limit": STEPS, "prompts_per_step": 2, "num_generations": 2, "micro_batch_size": 4,
        "max_completion_length": 4, "num_eval": 2, "learning_rate": 0.01, "seed": 3, "progress": False,
        "output_dir": str(out)})
    train(config)
    assert RunDir(out).checkpoint_steps() == [1, 2, 3]
    return out


def copy_run(base: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "run"))


class Payload:
    """Unpickling this creates `marker`: what a crafted state.pt could do on the earlier torch.load."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def craft_state(ckpt: Path, marker: Path) -> None:
    """Replace a checkpoint's state.pt by one whose unpickling runs code (opens `marker` for writing)."""
    state = {"optimizer": Payload(marker), "scheduler": {}, "torch_rng": torch.get_rng_state(),
             "python_rng": random.getstate()}
    torch.save(state, ckpt / "state.pt")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt(ckpt: Path, how: str, marker: Path) -> None:
    if how == "pickle":
        craft_state(ckpt, marker)
    else:
        truncate(ckpt / ("trained.safetensors" if how == "safetensors" else "state.pt"))


def run_cli(capfd, argv: list[str]) -> tuple[int, str, list[str]]:
    """The CLI in-process: exit code, stdout, and the non-empty stderr lines (file descriptor 2 itself)."""
    capfd.readouterr()
    code = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    assert "Traceback" not in err, err
    return code, out, [line for line in err.splitlines() if line.strip()]


def command(kind: str, run: Path, tmp_path: Path) -> list[str]:
    return {"eval": ["eval", run, "--k", "0", "--num-eval", "2", "--max-completion-length", "4"],
            "export": ["export", run, "--output", tmp_path / "merged"],
            "resume": ["train", "--resume", "--output-dir", run, "--no-progress"]}[kind]


def layer_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.startswith("model.layers.1.")}


# ----------------------------------------------------------------------------- crafted / truncated checkpoints


@pytest.mark.parametrize("kind", ["eval", "export", "resume"])
@pytest.mark.parametrize("how", ["pickle", "safetensors", "state"])
def test_unreadable_latest_checkpoint_falls_back(capfd, base_run, tmp_path, how, kind):
    """step-3 crafted or truncated: one warning line, step-2 is used, a pickled payload never runs."""
    run = copy_run(base_run, tmp_path)
    step2 = load_file(str(run / "checkpoints" / "step-2" / "trained.safetensors"))
    marker = tmp_path / "pwned"
    corrupt(run / "checkpoints" / "step-3", how, marker)

    code, out, err = run_cli(capfd, command(kind, run, tmp_path))

    assert not marker.exists(), "the pickled payload ran"
    assert code == 0, err
    assert len(err) == 1, err
    assert err[0].startswith("sparselayer: warning:") and "step-3" in err[0] and "unreadable" in err[0], err
    assert "using step-2" in err[0], err
    if kind == "eval":
        assert json.loads(out)["model"].endswith("(step 2)")
    elif kind == "export":
        merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
        for name, tensor in step2.items():
            assert torch.equal(merged[name], tensor), name
    else:  # resumed from step 2: step 3 retrained, the bad one set aside, each metrics step once
        assert "set aside as unreadable-step-3" in err[0]
        assert (run / "checkpoints" / "unreadable-step-3").is_dir()
        assert RunDir.load_checkpoint(run / "checkpoints" / "step-3")[2]["step"] == 3
        assert [r["step"] for r in RunDir(run).read_metrics()] == [1, 2, 3]
        assert not (run / ".lock").exists()


@pytest.mark.parametrize("kind", ["eval", "export", "resume"])
def test_no_intact_checkpoint_is_one_line(capfd, base_run, tmp_path, kind):
    run = copy_run(base_run, tmp_path)
    marker = tmp_path / "pwned"
    for step, how in zip((1, 2, 3), ("pickle", "safetensors", "state")):
        corrupt(run / "checkpoints" / f"step-{step}", how, marker)

    code, _, err = run_cli(capfd, command(kind, run, tmp_path))

    assert not marker.exists(), "the pickled payload ran"
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("sparselayer: error: no intact checkpoint in") and "step-1" in err[0], err
    assert not (tmp_path / "merged").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2", "step-3"]


def test_state_written_by_the_previous_code_resumes(capfd, base_run, tmp_path):
    """Compatibility: a checkpoint written with the earlier calls (save_file, torch.save to a path) resumes."""
    run = copy_run(base_run, tmp_path)
    ckpt = run / "checkpoints" / "step-3"
    state = torch.load(ckpt / "state.pt", weights_only=False)  # our own file: trusted
    assert isinstance(state["python_rng"], tuple)
    tensors = load_file(str(ckpt / "trained.safetensors"))
    save_file(tensors, str(ckpt / "trained.safetensors"))
    torch.save(state, ckpt / "state.pt")
    code, _, err = run_cli(capfd, ["train", "--resume", "--output-dir", run, "--max-steps", STEPS + 1,
                                   "--no-progress"])
    assert code == 0 and err == [], err
    assert RunDir(run).checkpoint_steps()[-1] == STEPS + 1


# ----------------------------------------------------------------------------- one process per run folder

HOLDER = ("import sys\nfrom sparselayer.runs import RunDir\nwith RunDir(sys.argv[1]).lock():\n"
          "    print('locked', flush=True)\n    sys.stdin.read()\n")


def start_holder(folder: Path) -> subprocess.Popen:
    """Another process that holds the run folder's lock until its stdin closes (or it is killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=CHILD_ENV)
    assert proc.stdout.readline().strip() == "locked", "the lock holder did not start"
    return proc


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.parametrize("resume", [False, True])
def test_second_train_on_a_locked_folder_is_refused(capfd, base_run, tiny_model, tmp_path, resume):
    """Another process holds the folder: `train` exits 2 with one line naming its PID and writes nothing."""
    run = copy_run(base_run, tmp_path) if resume else tmp_path / "fresh"
    holder = start_holder(run)
    try:
        before = snapshot(run)
        argv = ["train", "--output-dir", run, "--no-progress"]
        argv += ["--resume", "--max-steps", STEPS + 1] if resume else [
            "--model", tiny_model, "--layer", "1", "--max-steps", 1, "--prompts-per-step", 2,
            "--num-generations", 2, "--num-eval", 2, "--no-eval-at-start", "--no-eval-at-end"]
        code, _, err = run_cli(capfd, argv)
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith("sparselayer: error:") and f"PID {holder.pid}" in err[0], err
        assert str(run) in err[0]
        assert snapshot(run) == before, "the refused process wrote into the run folder"
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (run / ".lock").exists(), "the holder removes its lock file on release"


def test_lock_of_a_killed_process_is_free(tmp_path):
    """flock dies with its process: after SIGKILL the stale .lock is taken over and holds our PID."""
    folder = tmp_path / "run"
    holder = start_holder(folder)
    holder.kill()
    holder.wait(timeout=60)
    assert (folder / ".lock").read_text().strip() == str(holder.pid)
    with RunDir(folder).lock():
        assert (folder / ".lock").read_text().strip() == str(os.getpid())
    assert not (folder / ".lock").exists()
    new = tmp_path / "new" / "run"
    with RunDir(new).lock():
        assert new.is_dir()
    assert not (tmp_path / "new").exists(), "folders the lock created and nothing used are removed again"


# ----------------------------------------------------------------------------- full disk


def _limit_file_size(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _limit_for(run: Path, where: str) -> int:
    """A file-size limit that fails the next write of `where` and lets everything before it through."""
    ckpt = run / "checkpoints" / f"step-{STEPS}"
    tensors, state = (ckpt / "trained.safetensors").stat().st_size, (ckpt / "state.pt").stat().st_size
    small = max((run / n).stat().st_size for n in ("config.yaml", "metrics.jsonl", "summary.json")) + 64
    limit = {"trained.safetensors": tensors // 2, "state.pt": (tensors + state) // 2, "metrics.jsonl": small}[where]
    assert small <= limit and (where != "state.pt" or tensors < limit < state)
    return limit


@pytest.mark.parametrize("where", ["trained.safetensors", "state.pt", "metrics.jsonl"])
def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(base_run, tmp_path, where):
    run = copy_run(base_run, tmp_path)
    last = run / "checkpoints" / f"step-{STEPS}"
    files_before = {f.name: f.read_bytes() for f in last.iterdir()}
    cmd = [sys.executable, "-m", "sparselayer.cli", "train", "--resume", "--output-dir", str(run),
           "--max-steps", str(STEPS + 1), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=CHILD_ENV, timeout=600,
                          preexec_fn=_limit_file_size(_limit_for(run, where)))
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(err) == 1, done.stderr[-3000:]
    assert err[0].startswith("sparselayer: error: out of disk space in") and str(run) in err[0], err
    assert f"step-{STEPS} is intact" in err[0], err
    assert RunDir(run).checkpoint_steps() == [1, 2, STEPS]
    assert {f.name: f.read_bytes() for f in last.iterdir()} == files_before
    RunDir.load_checkpoint(last)
    hidden = [p for p in run.rglob(".*")]
    assert hidden == [], f"half-written files left: {hidden}"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines][-1] in (STEPS, STEPS + 1)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("what", ["safetensors", "torch.save"])
def test_enospc_keeps_its_errno(what):
    """/dev/full fails every write with ENOSPC: torch.save's RuntimeError must not hide it (the earlier
    code printed `[enforce fail at inline_container.cc]`, with no word about space)."""
    from sparselayer.runs import _write_file, is_disk_full  # every checkpoint file is written through it

    data = {"w": torch.ones(4096)}
    if what == "safetensors":
        def write(f):
            f.write(safetensors_bytes(data))
    else:
        def write(f):
            torch.save(data, f)
    with pytest.raises(OSError) as caught:
        _write_file(Path("/dev/full"), write)
    assert is_disk_full(caught.value) and caught.value.errno == errno.ENOSPC


# ----------------------------------------------------------------------------- durability and state loading


def _fsync_recorder(monkeypatch, watched: Path, target: Path) -> list[bool]:
    """Record, for each fsync of directory `watched`, whether `target` already existed (renamed in)."""
    seen: list[bool] = []
    real = os.fsync
    ino = watched.stat().st_ino

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode) and st.st_ino == ino:
            seen.append(target.exists())
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_renames_are_fsynced_in_their_directory(monkeypatch, tmp_path):
    run = RunDir(tmp_path / "run").create()
    seen = _fsync_recorder(monkeypatch, run.checkpoints, run.checkpoints / "step-1")
    run.save_checkpoint(1, {"w": torch.ones(2)}, {"optimizer": {}, "scheduler": {}, "torch_rng": torch.get_rng_state(),
                                                  "python_rng": random.getstate()}, {})
    assert True in seen, "checkpoints/ was not fsynced after the rename"
    seen = _fsync_recorder(monkeypatch, run.path, run.summary_path)
    atomic_write_text(run.summary_path, "{}\n")
    assert True in seen, "the folder of an atomic write was not fsynced after the rename"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("optim", ["adamw", "adamw8bit"])
def test_optimizer_state_round_trips_with_weights_only(tmp_path, optim, dtype):
    """AdamW and bitsandbytes' AdamW8bit state (fp32 masters for bf16) and the Python RNG state survive a
    checkpoint read with weights_only=True; the resumed optimizer steps exactly like the original."""
    if optim == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    init = torch.randn(64, 128).to(dtype)

    def fresh():
        p = torch.nn.Parameter(init.clone())
        opt = build_optimizer([p], optim, 1e-2)
        return p, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))

    def step(p, opt, sched, seed):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
        opt.step(), sched.step(), opt.zero_grad()

    p, opt, sched = fresh()
    for s in range(2):
        step(p, opt, sched, s)
    random.seed(11)
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
             "python_rng": random.getstate()}
    run = RunDir(tmp_path / "run")
    ckpt = run.save_checkpoint(2, {"w": p.detach()}, state, {})
    expected_draws = [random.random() for _ in range(3)]
    torch.load(ckpt / "state.pt", weights_only=True)  # plain data and tensors only

    _, loaded, _ = RunDir.load_checkpoint(ckpt)
    if optim == "adamw8bit":
        assert torch.uint8 in _tensor_dtypes(loaded["optimizer"]["state"]), "8-bit moments expected"
    q, opt2, sched2 = fresh()
    opt2.load_state_dict(loaded["optimizer"])
    sched2.load_state_dict(loaded["scheduler"])
    with torch.no_grad():
        q.copy_(p)
    random.setstate(loaded["python_rng"])
    assert [random.random() for _ in range(3)] == expected_draws
    step(p, opt, sched, 5), step(q, opt2, sched2, 5)
    assert torch.equal(p, q)


def _tensor_dtypes(value) -> set[torch.dtype]:
    """Dtypes of every tensor nested in dicts and lists (bitsandbytes nests its quantized state)."""
    if isinstance(value, torch.Tensor):
        return {value.dtype}
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return set().union(*map(_tensor_dtypes, items)) if items else set()


def test_python_rng_state_from_lists():
    """A random state stored as nested lists (JSON-like) becomes setstate's tuples again."""
    state = random.getstate()
    as_lists = [state[0], list(state[1]), state[2]]
    assert python_rng_state(as_lists) == state
    with pytest.raises(TypeError):
        python_rng_state("not a state")
