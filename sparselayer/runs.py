"""The run directory: resolved config, metrics.jsonl, atomic checkpoints of what changes, resume.

Layout: config.yaml, metrics.jsonl (one JSON line per step), checkpoints/step-N/{trained.safetensors,
state.pt, meta.json}, summary.json, and .lock while a `train` uses the folder. A checkpoint is written
into a hidden temporary folder and renamed into place (the rename then fsynced in the folder's parent),
so a kill or a full disk at any moment leaves either the old or the new checkpoint, whole. state.pt is
read with `torch.load(weights_only=True)`: tensors and plain data only, never code. A checkpoint that
cannot be read is skipped for the newest intact one (`RunDir.newest_intact`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .errors import RunError

CHECKPOINT_PREFIX = "step-"
UNREADABLE_PREFIX = "unreadable-"  # where --resume sets aside a checkpoint it could not read
LOCK_FILE = ".lock"
STATE_KEYS = ("optimizer", "scheduler", "torch_rng", "python_rng")
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})  # no space, quota, file-size limit
NO_LOCKING = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP})  # filesystems without flock

CheckpointParts = tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]  # tensors, state, meta


def warn(message: str) -> None:
    """One warning line on stderr (the CLI's convention: `sparselayer: warning: ...`)."""
    print(f"sparselayer: warning: {message}", file=sys.stderr, flush=True)


def is_disk_full(exc: BaseException) -> bool:
    """True for a write that failed for lack of space: ENOSPC, EDQUOT, or EFBIG (a file-size limit)."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` durable: after a rename, the new name survives a power loss."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot sync a directory; the rename itself is still atomic
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and an atomic rename."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file, fsync, an atomic rename and an fsync of the folder.

    On failure (a full disk included) the temporary file is removed and `path` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the user's usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _read_umask() -> int:
    """The process's umask (read once at import: setting it is process-wide and not thread-safe)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


class CheckpointUnreadable(RunError):
    """One checkpoint folder cannot be used: a file is missing, truncated, corrupt or not plain data."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"checkpoint {path} is unreadable: {reason}")
        self.reason = reason


class Checkpoint(NamedTuple):
    """A checkpoint read whole, and the newer ones that could not be read (path, reason), newest first."""

    path: Path
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    meta: dict[str, Any]
    skipped: list[tuple[Path, str]]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def skipped_note(self) -> str | None:
        """One line naming the unreadable newer checkpoints and why (None when none was skipped)."""
        if not self.skipped:
            return None
        names = ", ".join(p.name for p, _ in self.skipped)
        what = "is" if len(self.skipped) == 1 else "are"
        return f"{names} in {self.path.parent} {what} unreadable ({self.skipped[0][1]}); using {self.path.name}"


class RunLock:
    """An exclusive `flock` on RUN/.lock that holds the owner's PID, so one process at a time trains a run.

    The kernel drops a flock when its process ends, a crash or SIGKILL included: a lock file left behind
    by a dead process is simply taken over. Releasing removes the lock file, and the run folder itself
    when this lock created it and it is still empty (a run that failed before writing anything leaves
    nothing). A process that locked a file removed meanwhile retries on the new one (inode check).
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> RunLock:
        """Take the lock or raise RunError naming the holder's PID; nothing else is written first."""
        while self._fd is None:
            self._make_dirs()
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except FileNotFoundError:  # the folder was removed by a releasing holder: make it again
                continue
            if self._lock(fd):
                self._fd = fd
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        """Remove the lock file (and the folders this lock created, when empty), then unlock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            for folder in reversed(self._created):
                with contextlib.suppress(OSError):  # not empty: the run wrote something, keep it
                    folder.rmdir()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _make_dirs(self) -> None:
        """Create the run folder (and missing parents), remembering which ones this lock made."""
        missing = [p for p in (self.directory, *self.directory.parents) if not p.exists()]
        self.directory.mkdir(parents=True, exist_ok=True)
        self._created += [p for p in reversed(missing) if p not in self._created]

    def _lock(self, fd: int) -> bool:
        """flock `fd`; False (fd closed) when the file was replaced meanwhile; RunError when held elsewhere."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder_pid(fd)
            os.close(fd)
            raise RunError(f"{self.directory} is in use by another sparselayer process (PID {pid}): wait for it "
                           "to end or stop it, or pick another --output-dir") from None
        except OSError as exc:
            if exc.errno not in NO_LOCKING:
                os.close(fd)
                raise
            warn(f"cannot lock {self.directory} ({exc.strerror}): make sure no other process uses it")
            return True
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
        return same


def _holder_pid(fd: int) -> str:
    """The PID written in a lock file by its holder (it writes it right after locking: wait a moment for it)."""
    for _ in range(40):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text:
            return text if text.isdigit() else "unknown"
        time.sleep(0.05)
    return "unknown"


class _KeepWriteError:
    """A binary file that keeps the OSError of a failed write: torch.save turns one into a RuntimeError
    without its errno, and a full disk must still be told apart from other failures."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as exc:
            self.error = exc
            raise


def _write_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Create `path` through `write`, then fsync it; an OSError of the write is raised as itself."""
    with open(path, "wb") as f:
        out = _KeepWriteError(f)
        try:
            write(out)
            out.flush()
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise
        os.fsync(f.fileno())


def append_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Append JSON lines and flush them to disk; a failed write (full disk) is cut off again, so the file
    never ends in half a line."""
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    with open(path, "ab", buffering=0) as f:
        start = f.seek(0, os.SEEK_END)
        try:
            while data:
                data = data[f.write(data):]
            os.fsync(f.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(f.fileno(), start)
            raise


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON-object lines of a file ([] when absent); a line cut by a crash is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line) if line.strip().startswith("{") else None
            if isinstance(record, dict):
                records.append(record)
    return records


class RunDir:
    """One training run's folder on disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics_path = self.path / "metrics.jsonl"
        self.config_path = self.path / "config.yaml"
        self.summary_path = self.path / "summary.json"
        self.completions_path = self.path / "completions.jsonl"  # --log-completions

    def lock(self) -> RunLock:
        """The run's exclusive lock, to use as `with run.lock():` (refused with the holder's PID)."""
        return RunLock(self.path)

    def create(self) -> RunDir:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        for stale in self.checkpoints.glob(".tmp-*"):  # left by a kill during a save
            shutil.rmtree(stale, ignore_errors=True)
        return self

    def has_run(self) -> bool:
        return self.config_path.exists() or self.latest_checkpoint() is not None

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            raise RunError(f"{self.path} is not a sparselayer run directory (no config.yaml)")
        try:
            data = yaml.safe_load(self.config_path.read_text()) or {}
        except yaml.YAMLError:
            raise RunError(f"{self.config_path} is not valid YAML") from None
        if not isinstance(data, dict):
            raise RunError(f"{self.config_path} does not hold a mapping of settings")
        return data

    def read_summary(self) -> dict[str, Any]:
        """The run's summary.json ({} before the first one is written): results, base/final accuracy."""
        if not self.summary_path.is_file():
            return {}
        try:
            data = json.loads(self.summary_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RunError(f"{self.summary_path} is not valid JSON") from None
        if not isinstance(data, dict):
            raise RunError(f"{self.summary_path} does not hold a summary (a JSON object)")
        return data

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Replace summary.json atomically (a kill leaves the old summary or the new one, whole)."""
        atomic_write_text(self.summary_path, json.dumps(summary, indent=2) + "\n")

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one line to metrics.jsonl (see `append_jsonl`)."""
        append_jsonl(self.metrics_path, [record])

    def append_completions(self, rows: list[dict[str, Any]]) -> None:
        """Append sample completions (one JSON line each) to completions.jsonl."""
        append_jsonl(self.completions_path, rows)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The metrics lines; a line that is not a whole JSON object (cut by a crash) is skipped."""
        return read_jsonl(self.metrics_path)

    def truncate_metrics(self, last_step: int) -> None:
        """Drop metrics and completion lines of steps after `last_step` (logged after the checkpoint a
        resume starts from)."""
        for path in (self.metrics_path, self.completions_path):
            if path.exists() or path == self.metrics_path:
                kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def checkpoint_steps(self) -> list[int]:
        steps = []
        for d in self.checkpoints.glob(CHECKPOINT_PREFIX + "*"):
            suffix = d.name[len(CHECKPOINT_PREFIX):]
            if suffix.isdigit() and (d / "meta.json").exists():
                steps.append(int(suffix))
        return sorted(steps)

    def latest_checkpoint(self) -> Path | None:
        steps = self.checkpoint_steps()
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{steps[-1]}" if steps else None

    def save_checkpoint(self, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any],
                        meta: dict[str, Any], keep: int = 2) -> Path:
        """Write trained tensors, optimizer/RNG state and metadata atomically; keep the newest `keep`.

        Out of disk space, the half-written checkpoint is removed and a one-line RunError says so;
        the previous checkpoint is untouched.
        """
        self.create()
        final = self.checkpoints / f"{CHECKPOINT_PREFIX}{step}"
        tmp = Path(tempfile.mkdtemp(dir=self.checkpoints, prefix=f".tmp-{step}-"))
        try:
            _write_checkpoint_files(tmp, tensors, state, {"step": step, **meta})
            if final.exists():
                self._discard(final)
            os.rename(tmp, final)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(exc):
                raise self.disk_full_error(exc, f"while writing checkpoint {final.name}") from None
            raise
        fsync_dir(self.checkpoints)
        for old in self.checkpoint_steps()[:-keep]:
            self._discard(self.checkpoints / f"{CHECKPOINT_PREFIX}{old}")
        return final

    def disk_full_error(self, exc: OSError, doing: str = "while training") -> RunError:
        """The one line for a write that ran out of space: where, why, and which checkpoint is intact."""
        latest = self.latest_checkpoint()
        kept = f"the last checkpoint {latest.name} is intact" if latest else "no checkpoint was written yet"
        return RunError(f"out of disk space in {self.path} ({exc.strerror or exc}) {doing}: {kept}; "
                        "free some space and continue with --resume")

    @contextlib.contextmanager
    def disk_errors(self) -> Iterator[None]:
        """Turn a full disk (ENOSPC, EDQUOT, EFBIG) anywhere inside into `disk_full_error`'s one line."""
        try:
            yield
        except OSError as exc:
            if is_disk_full(exc):
                raise self.disk_full_error(exc) from None
            raise

    def _discard(self, path: Path) -> None:
        trash = path.with_name(f".tmp-trash-{path.name}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def set_aside(self, path: Path) -> Path:
        """Rename an unreadable checkpoint to checkpoints/unreadable-step-N (kept for a look, no longer
        a checkpoint), so that saving and pruning never mistake it for a good one."""
        dest = path.with_name(UNREADABLE_PREFIX + path.name)
        if dest.exists():
            self._discard(dest)
        os.rename(path, dest)
        fsync_dir(path.parent)
        return dest

    def newest_intact(self, mmap: bool = False) -> Checkpoint | None:
        """The newest checkpoint whose three files all read (None when there is no checkpoint at all).

        Unreadable newer ones are listed in `skipped`; a RunError when not one checkpoint is intact.
        `mmap` maps state.pt's tensors instead of reading them (for eval and export, which only check it).
        """
        skipped: list[tuple[Path, str]] = []
        for step in reversed(self.checkpoint_steps()):
            path = self.checkpoints / f"{CHECKPOINT_PREFIX}{step}"
            try:
                tensors, state, meta = self.load_checkpoint(path, mmap)
            except CheckpointUnreadable as exc:
                skipped.append((path, exc.reason))
                continue
            return Checkpoint(path, tensors, state, meta, skipped)
        if skipped:
            names = ", ".join(p.name for p, _ in skipped)
            raise RunError(f"no intact checkpoint in {self.checkpoints}: {names} unreadable "
                           f"({skipped[0][0].name}: {skipped[0][1]})")
        return None

    @staticmethod
    def load_checkpoint(path: Path, mmap: bool = False) -> CheckpointParts:
        """Trained tensors, optimizer/RNG state and metadata of one checkpoint folder.

        state.pt is read with weights_only=True (tensors and plain data; a pickled object is refused
        unread) onto the CPU, its tensors memory-mapped with `mmap`. Raises CheckpointUnreadable,
        whose `reason` says which file and why.
        """
        name = "trained.safetensors"
        try:
            tensors = load_file(str(path / name))
            name = "state.pt"
            state = _check_state(torch.load(path / name, map_location="cpu", weights_only=True, mmap=mmap))
            name = "meta.json"
            meta = _check_meta(json.loads((path / name).read_text()))
        except (OSError, RuntimeError, ValueError, TypeError, KeyError, EOFError, pickle.UnpicklingError,
                SafetensorError) as exc:
            raise CheckpointUnreadable(path, f"{name}: {_describe(exc)}") from None
        return tensors, state, meta


def _write_checkpoint_files(folder: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any],
                            meta: dict[str, Any]) -> None:
    """The three files of a checkpoint, each fsynced, then the folder itself (still under its hidden name)."""
    os.chmod(folder, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders; give the user's usual permissions
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _write_file(folder / "trained.safetensors", lambda f: f.write(safetensors_bytes(cpu)))
    _write_file(folder / "state.pt", lambda f: torch.save(state, f))
    _write_file(folder / "meta.json", lambda f: f.write(json.dumps(meta, indent=2).encode()))
    fsync_dir(folder)


def python_rng_state(value: Any) -> tuple:
    """`random.setstate`'s tuple from a saved state, nested lists turned back into tuples."""
    if isinstance(value, (list, tuple)):
        return tuple(python_rng_state(v) if isinstance(v, (list, tuple)) else v for v in value)
    raise TypeError(f"python_rng is a {type(value).__name__}, not a random state")


def _check_state(state: Any) -> dict[str, Any]:
    """state.pt's dict, checked enough that restoring it cannot fail halfway: keys, RNG states."""
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a dict of training state")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"no {missing[0]} entry")
    if not isinstance(state["optimizer"], dict) or not isinstance(state["scheduler"], dict):
        raise ValueError("optimizer or scheduler state is not a dict")
    rng = state["torch_rng"]
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
        raise ValueError("torch_rng is not a byte tensor")
    state["python_rng"] = python_rng_state(state["python_rng"])
    random.Random().setstate(state["python_rng"])  # validates it without touching the global generator
    return state


def _check_meta(meta: Any) -> dict[str, Any]:
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise ValueError("no integer step")
    return meta


def _describe(exc: BaseException) -> str:
    """A short reason for an unreadable file (torch's weights_only refusal names the refused global)."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError):
        found = re.search(r"GLOBAL (\S+)", text)
        what = found.group(1) if found else "an object"
        return f"it refers to {what}, not only tensors and plain data (not loaded: unpickling it could run code)"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first[:200] or f"{type(exc).__name__} (truncated or empty)"
