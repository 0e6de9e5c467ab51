"""Run untrusted Python code in a fresh, limited interpreter, and clean up after it whatever happens.

`run_python(source, files, limits)` writes `source` (as main.py) and `files` into a private temporary
directory, runs `python -I -B [-S] sandbox_guard.py SETTINGS main.py` there in a new session (its own
process group), reads at most `limits.output_bytes` of its stdout and of its stderr, kills the whole
process group when it ends, runs past `limits.timeout` or writes too much, and removes the directory.
The child side (sandbox_guard.py) sets the resource limits and installs an audit hook that refuses
processes, the network, writes outside the directory and ctypes. Where `unshare -n` works (root, or
user namespaces allowed), the child also runs in an empty network namespace; nothing depends on it.

This module knows nothing of rewards or the trainer: sparselayer.tasks.code_reward builds on it.
It guards against accidents and naive hostile code; it is not a security boundary (docs/rewards.md).
"""
from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

from ..errors import ConfigError

GUARD = Path(__file__).with_name("sandbox_guard.py")
CHILD_ENV = {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1",
             "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
POLL_SECONDS = 0.02  # how often a finished-output child is checked for exit


@dataclass(frozen=True)
class SandboxLimits:
    """What one sandboxed run may use. Every run gets a fresh interpreter and a fresh directory.

    `timeout` is wall-clock seconds for the whole run (then the process group is killed);
    `cpu_seconds` is RLIMIT_CPU, `memory_bytes` RLIMIT_AS (address space), `file_bytes` RLIMIT_FSIZE
    (largest file it may write), `processes` RLIMIT_NPROC (binds non-root users only, and counts their
    threads too; the audit hook refuses new processes for everyone), `open_files` RLIMIT_NOFILE;
    `output_bytes` caps what is read of stdout and of stderr (more ends the run). `network_namespace`:
    also run under `unshare -n` where that works. `site_packages`: let the code import installed
    third-party packages (runs their .pth files at start-up); off, the standard library only (`-S`).
    """

    timeout: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    output_bytes: int = 1 << 20
    processes: int = 1
    open_files: int = 64
    network_namespace: bool = True
    site_packages: bool = False

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ConfigError(f"sandbox timeout must be positive seconds, got {self.timeout}")
        for name in ("cpu_seconds", "memory_bytes", "file_bytes", "output_bytes", "processes", "open_files"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sandbox {name} must be at least 1, got {getattr(self, name)}")

    def child_settings(self) -> str:
        """The rlimits the guard sets, as the JSON it reads."""
        keys = ("cpu_seconds", "memory_bytes", "file_bytes", "processes", "open_files")
        return json.dumps({k: v for k, v in asdict(self).items() if k in keys})


@dataclass(frozen=True)
class SandboxResult:
    """How a run ended: `status` "exited" (returncode: its exit status, negative for a signal, e.g. -9
    when the CPU limit killed it), "timeout" or "output_limit" (killed by the parent); what was read of
    stdout and stderr (at most output_bytes each)."""

    status: str
    returncode: int | None
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        """Whether the program exited by itself with status 0."""
        return self.status == "exited" and self.returncode == 0


@cache
def network_namespace_available() -> bool:
    """Whether `unshare -n` works here without help (root, or unprivileged user namespaces allowed)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    try:
        return subprocess.run([unshare, "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def command(limits: SandboxLimits, program: str = "main.py") -> list[str]:
    """The command line of a sandboxed run of `program` (a file in the working directory)."""
    python = [sys.executable, "-I", "-B", *([] if limits.site_packages else ["-S"]), "-X", "utf8"]
    prefix = ["unshare", "-n"] if limits.network_namespace and network_namespace_available() else []
    return [*prefix, *python, str(GUARD), limits.child_settings(), program]


def run_python(source: str, files: Mapping[str, str | bytes] | None = None,
               limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `source` as a program in a fresh sandbox, with `files` (name -> content) beside it."""
    limits = limits or SandboxLimits()
    root = tempfile.mkdtemp(prefix="sparselayer-sandbox-")
    try:
        for name, content in {**(files or {}), "main.py": source}.items():
            Path(root, name).write_bytes(content.encode() if isinstance(content, str) else content)
        return _run(command(limits), root, limits)
    finally:
        remove_tree(root)


def _run(argv: list[str], root: str, limits: SandboxLimits) -> SandboxResult:
    """Start the child in its own session, read its output within the limits, and kill its group."""
    deadline = time.monotonic() + limits.timeout
    child = subprocess.Popen(argv, cwd=root, env={**CHILD_ENV, "HOME": root, "TMPDIR": root},
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    try:
        status, out, err = _read(child, deadline, limits.output_bytes)
        if status == "exited" and not _exited_by(child, deadline):
            status = "timeout"
    finally:
        _kill_group(child)  # before the child is reaped, so its process-group id cannot have been reused
        child.wait()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    return SandboxResult(status, child.returncode if status == "exited" else None, out, err)


def _read(child: subprocess.Popen, deadline: float, cap: int) -> tuple[str, bytes, bytes]:
    """Read stdout and stderr until both close ("exited"), the deadline ("timeout") or either passes
    `cap` bytes ("output_limit")."""
    buffers = {child.stdout: bytearray(), child.stderr: bytearray()}
    with selectors.DefaultSelector() as selector:
        for stream in buffers:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout", *_capped(buffers, child, cap)
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffers[key.fileobj] += chunk
                if len(buffers[key.fileobj]) > cap:
                    return "output_limit", *_capped(buffers, child, cap)
    return "exited", *_capped(buffers, child, cap)


def _capped(buffers: dict, child: subprocess.Popen, cap: int) -> tuple[bytes, bytes]:
    return bytes(buffers[child.stdout][:cap]), bytes(buffers[child.stderr][:cap])


def _exited_by(child: subprocess.Popen, deadline: float) -> bool:
    """Wait, without reaping it, until the child exits or the deadline passes; whether it exited."""
    while True:
        if os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)


def _kill_group(child: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (it leads its own session)."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def remove_tree(root: str) -> None:
    """Remove a sandbox directory, whatever the program did to its contents' permissions."""
    def make_writable_and_retry(function, path, _exc_info) -> None:
        try:
            os.chmod(os.path.dirname(path), stat.S_IRWXU)
            if os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, stat.S_IRWXU)
            function(path)
        except OSError:
            pass

    shutil.rmtree(root, onerror=make_writable_and_retry)
