"""The sandbox: hostile programs end within their limits, do nothing outside their directory, reach no
network, start no process, and leave nothing on disk; the calling process carries on."""
from __future__ import annotations

import os
import socket
import textwrap
from pathlib import Path

import pytest

from sparselayer.errors import ConfigError
from sparselayer.tasks.sandbox import SandboxLimits, SandboxResult, network_namespace_available, run_python

# Generous: a loaded machine must never fail these. The CPU limit, not the wall clock, ends a busy loop.
LIMITS = SandboxLimits(timeout=60, cpu_seconds=2, output_bytes=64 << 10)


def run(source: str, limits: SandboxLimits = LIMITS) -> SandboxResult:
    return run_python(textwrap.dedent(source), limits=limits)


def refused(result: SandboxResult, event: str) -> bool:
    """Whether the program failed on the audit hook's refusal of `event`."""
    return not result.ok and f"sandbox: {event} refused" in result.stderr.decode()


def test_a_well_behaved_program_runs_and_may_use_its_directory(sandbox_tmp: Path) -> None:
    result = run("""
        import os, sys
        open("a.txt", "w").write("kept")
        os.mkdir("sub")
        os.rename("a.txt", "sub/b.txt")
        print(open("sub/b.txt").read(), os.getcwd() == os.environ["TMPDIR"], sys.flags.isolated)
    """)
    assert result.ok and result.status == "exited", result.stderr
    assert result.stdout.decode().split() == ["kept", "True", "1"]
    assert [p.name for p in sandbox_tmp.iterdir()] == []


def test_infinite_loop_ends_within_its_limits(sandbox_tmp: Path) -> None:
    result = run("while True:\n    pass\n")
    assert not result.ok
    assert result.status == "timeout" or result.returncode < 0  # SIGXCPU / SIGKILL from RLIMIT_CPU


def test_wall_clock_timeout_kills_a_sleeping_program(sandbox_tmp: Path) -> None:
    result = run("import time\ntime.sleep(600)\n", SandboxLimits(timeout=1))
    assert result.status == "timeout" and result.returncode is None and not result.ok


@pytest.mark.parametrize("source, event", [
    ("import os\nwhile True:\n    os.fork()\n", "os.fork"),
    ("import os\nos.system('echo started')\n", "os.system"),
    ("import os\nos.execv('/bin/sh', ['sh', '-c', 'echo started'])\n", "os.exec"),
    ("import os\nos.posix_spawn('/bin/sh', ['sh', '-c', 'echo started'], {})\n", "os.posix_spawn"),
    ("import subprocess\n", "import"),
    ("import multiprocessing\n", "import"),
    ("import os, signal\nos.kill(os.getppid(), signal.SIGTERM)\n", "os.kill"),
])
def test_fork_bomb_and_other_process_starts_are_refused(sandbox_tmp: Path, source: str, event: str) -> None:
    result = run(source)
    assert refused(result, event), result.stderr
    assert b"started" not in result.stdout


def test_huge_allocation_fails_and_the_caller_carries_on(sandbox_tmp: Path) -> None:
    result = run("data = bytearray(10 * 1024 ** 3)\nprint('allocated')\n")
    assert not result.ok and b"MemoryError" in result.stderr and b"allocated" not in result.stdout
    assert run("print(sum(range(10)))").stdout == b"45\n"  # this process, and the next sandbox, are fine


@pytest.mark.parametrize("template", [
    "open({target!r}, 'w').write('x')",
    "import os\nos.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT))",
    "import os\nos.chdir({folder!r})\nopen({name!r}, 'a').write('x')",
    "import os\nopen('mine.txt', 'w').write('x')\nos.rename('mine.txt', {target!r})",
    "import os\nfd = os.open({folder!r}, os.O_RDONLY)\nos.close(os.open({name!r}, os.O_WRONLY | os.O_CREAT, "
    "dir_fd=fd))",
    "import os\nos.symlink({target!r}, 'link')\nopen('link', 'w').write('x')",
    "import builtins\nbuiltins.isinstance = lambda *a: True\nopen({target!r}, 'w').write('x')",
    "import os.path\nos.path.realpath = lambda p, **k: os.getcwd()\nopen({target!r}, 'w').write('x')",
    "import ctypes\nctypes.CDLL(None).creat({target!r}.encode(), 0o644)",
])
def test_writes_outside_the_directory_are_refused(sandbox_tmp: Path, tmp_path: Path, template: str) -> None:
    """The target is a path the test owns, outside the sandbox's directory: it must not exist afterwards."""
    target = tmp_path / "outside" / "written.txt"
    target.parent.mkdir()
    result = run(template.format(target=str(target), folder=str(target.parent), name=target.name))
    assert not result.ok and b"PermissionError: sandbox: " in result.stderr, result.stderr
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_relative_escape_and_removal_outside_are_refused(sandbox_tmp: Path, tmp_path: Path) -> None:
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    assert refused(run(f"import os\nos.remove({str(keep)!r})"), "os.remove")
    assert refused(run(f"import os\nos.chmod({str(keep)!r}, 0o777)"), "os.chmod")
    assert refused(run("open('../../escaped.txt', 'w')"), "open")
    assert keep.read_text() == "mine" and not (sandbox_tmp.parent / "escaped.txt").exists()


@pytest.mark.parametrize("namespace", [True, False])
def test_no_connection_reaches_a_local_listening_socket(sandbox_tmp: Path, namespace: bool) -> None:
    """The audit hook alone (namespace off) and with `unshare -n` where it works: nothing connects."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        result = run(f"""
            import socket
            s = socket.create_connection(("127.0.0.1", {port}), timeout=5)
            s.sendall(b"hello")
            print("connected")
        """, SandboxLimits(timeout=60, cpu_seconds=5, network_namespace=namespace))
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert not result.ok and b"connected" not in result.stdout
    assert refused(result, "socket.getaddrinfo") or refused(result, "socket.__new__"), result.stderr


def test_name_lookups_are_refused(sandbox_tmp: Path) -> None:
    assert refused(run("import socket\nsocket.getaddrinfo('localhost', 80)"), "socket.getaddrinfo")


def test_network_namespace_probe_answers() -> None:
    """`unshare -n` is used where it works and never required: the probe just answers yes or no."""
    assert network_namespace_available() in (True, False)


def test_huge_print_is_cut_at_the_output_limit(sandbox_tmp: Path) -> None:
    result = run("while True:\n    print('x' * 100_000)\n")
    assert result.status == "output_limit" and not result.ok
    assert len(result.stdout) <= LIMITS.output_bytes and len(result.stderr) <= LIMITS.output_bytes


def test_large_files_stop_at_the_file_size_limit(sandbox_tmp: Path) -> None:
    result = run("open('big.bin', 'wb').write(b'x' * (8 << 20))\nprint('written')",
                 SandboxLimits(timeout=60, file_bytes=1 << 20))
    assert not result.ok and b"written" not in result.stdout


def test_directory_is_removed_even_when_the_program_locks_it_down(sandbox_tmp: Path) -> None:
    result = run("""
        import os
        os.mkdir("locked")
        open("locked/f.txt", "w").write("x")
        os.chmod("locked/f.txt", 0)
        os.chmod("locked", 0)
        os.chmod(".", 0o500)
        print("done")
    """)
    assert result.ok and result.stdout == b"done\n", result.stderr
    # the fixture checks that TMPDIR is empty


def test_bad_limits_are_one_line_config_errors() -> None:
    for kwargs in ({"timeout": 0}, {"cpu_seconds": 0}, {"memory_bytes": -1}, {"output_bytes": 0}):
        with pytest.raises(ConfigError, match="sandbox "):
            SandboxLimits(**kwargs)


def test_the_sandbox_runs_in_its_own_session(sandbox_tmp: Path) -> None:
    """Its own process group (what the parent kills), not ours."""
    result = run("import os\nprint(os.getpgrp() == os.getpid(), os.getpgrp())")
    leader, group = result.stdout.decode().split()
    assert leader == "True" and int(group) != os.getpgrp()
