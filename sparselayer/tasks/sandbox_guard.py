"""The child side of the sandbox: limits and an audit hook put on the interpreter, then the program runs.

Run by sparselayer.tasks.sandbox as `python -I -B [-S] sandbox_guard.py SETTINGS_JSON main.py`, with the
private directory as working directory. Standard library only: it runs in a fresh interpreter that need
not see sparselayer. Order matters: resource limits first, then the modules whose import is refused are
forgotten, then the audit hook goes on (it cannot be removed from Python), and only then does the
program run.

The hook refuses, for everyone including root (whom RLIMIT_NPROC does not bind):
  - starting processes and signalling others: fork, exec, spawn, system, subprocess, kill;
  - the network: creating sockets, connect, bind, name look-ups;
  - writing outside the private directory: `open` for writing, and removing, renaming, linking, making
    directories, changing modes/owners/times, anywhere but inside it; a `dir_fd` argument, which the
    hook cannot resolve, is refused;
  - native code: importing ctypes (and _posixsubprocess, which spawns without an audit event).
It is a guard against accidents and naive hostile code, not a security boundary (docs/rewards.md).
"""
from __future__ import annotations

import json
import os
import resource
import runpy
import sys

PROCESS_EVENTS = frozenset({"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                            "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn"})
NETWORK_EVENTS = frozenset({"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
                            "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo", "socket.sendto",
                            "socket.sendmsg"})
INTROSPECTION_EVENTS = frozenset({"gc.get_objects", "gc.get_referrers", "gc.get_referents"})
NATIVE_EVENTS = frozenset({"ctypes.dlopen", "ctypes.dlsym"})
ALWAYS_REFUSED = PROCESS_EVENTS | NETWORK_EVENTS | INTROSPECTION_EVENTS | NATIVE_EVENTS | frozenset(
    {"os.symlink", "os.link", "os.mkfifo", "os.mknod", "os.chflags", "os.lchflags", "os.chroot"})
REFUSED_MODULES = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "subprocess", "multiprocessing"})
# event: (positions of path arguments, positions of dir_fd arguments); -1 or None means "no dir_fd"
PATH_EVENTS = {
    "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
    "os.rename": ((0, 1), (2, 3)), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
    "os.utime": ((0,), (3,)), "os.truncate": ((0,), ()), "os.setxattr": ((0,), ()),
    "os.removexattr": ((0,), ()), "shutil.rmtree": ((0,), (1,)),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
WRITABLE_DEVICES = frozenset({os.devnull})


def set_limits(settings: dict) -> None:
    """CPU seconds, address space, file size, processes, open files; no core files."""
    cpu = int(settings["cpu_seconds"])
    limits = {resource.RLIMIT_CPU: (cpu, cpu + 1), resource.RLIMIT_AS: int(settings["memory_bytes"]),
              resource.RLIMIT_FSIZE: int(settings["file_bytes"]), resource.RLIMIT_NPROC: int(settings["processes"]),
              resource.RLIMIT_NOFILE: int(settings["open_files"]), resource.RLIMIT_CORE: 0}
    for kind, value in limits.items():
        soft, hard = value if isinstance(value, tuple) else (value, value)
        _, current_hard = resource.getrlimit(kind)
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(kind, (soft, hard))


def make_hook(root: str):
    """The audit hook: refuses the events above, and writes whose path is not inside `root`.

    Everything the hook calls is bound here, in its closure (builtins and C functions), so that the
    program cannot loosen it by replacing a builtin or a module attribute such as os.path.realpath.
    """
    fspath, getcwd, sep, encoding = os.fspath, os.getcwd, os.sep, sys.getfilesystemencoding()
    seps = (sep, sep.encode())
    _isinstance, _int, _bytes, _len, _any, _str = isinstance, int, bytes, len, any, str
    _PermissionError, _TypeError = PermissionError, TypeError
    always, modules, path_events, write_flags, devices = (ALWAYS_REFUSED, REFUSED_MODULES, dict(PATH_EVENTS),
                                                          WRITE_FLAGS, WRITABLE_DEVICES)

    def absolute(text: str) -> str:
        """`text` made absolute against the working directory, with . and .. resolved textually (the
        program cannot create symlinks, so inside the directory this is where the kernel would land)."""
        parts: list[str] = []
        for part in (text if text.startswith(sep) else getcwd() + sep + text).split(sep):
            if part == "..":
                if parts:
                    parts.pop()
            elif part not in ("", "."):
                parts.append(part)
        return sep + sep.join(parts)

    def absolute_path(path: object) -> bool:
        try:
            return fspath(path)[:1] in seps
        except _TypeError:
            return False

    def inside(path: object) -> bool:
        if _isinstance(path, _int):
            return False
        try:
            text = fspath(path)
        except _TypeError:
            return False
        if _isinstance(text, _bytes):
            text = text.decode(encoding, "surrogateescape")
        if text in devices:
            return True
        real = absolute(text)
        return real == root or real.startswith(root + sep)

    def refuse(event: str, detail: str = "") -> None:
        raise _PermissionError(f"sandbox: {event} refused{detail}")

    def hook(event: str, args: tuple) -> None:
        if event in always:
            refuse(event)
        elif event == "import" and _str(args[0]).partition(".")[0] in modules:
            refuse(event, f" ({args[0]})")
        elif event == "open":
            path, mode, flags = args
            writes = (flags or 0) & write_flags or (mode is not None and _any(c in _str(mode) for c in "wax+"))
            if not writes or _isinstance(path, _int):
                return
            if mode is None and not absolute_path(path):
                refuse(event, " (os.open for writing needs an absolute path: its dir_fd cannot be checked)")
            if not inside(path):
                refuse(event, f" (writing {path!r} outside the sandbox directory)")
        elif event in path_events:
            paths, dir_fds = path_events[event]
            if _any(i < _len(args) and args[i] not in (None, -1) for i in dir_fds):
                refuse(event, " (dir_fd)")
            for i in paths:
                if i < _len(args) and not (event == "os.truncate" and _isinstance(args[i], _int)) \
                        and not inside(args[i]):
                    refuse(event, f" ({args[i]!r} is outside the sandbox directory)")

    return hook


def main(argv: list[str]) -> None:
    """Limits, the hook, then the program `argv[2]` as __main__ with `argv[3:]` as its arguments."""
    settings, program = json.loads(argv[1]), argv[2]
    root = os.path.realpath(os.getcwd())
    set_limits(settings)
    for name in [m for m in sys.modules if m.partition(".")[0] in REFUSED_MODULES]:
        del sys.modules[name]
    sys.addaudithook(make_hook(root))
    sys.argv = [program, *argv[3:]]
    runpy.run_path(program, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv)
