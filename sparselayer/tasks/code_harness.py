"""Runs one completion's code against its tests, inside the sandbox (sandbox_guard.py has already set the
limits and the audit hook). Standard library only: it runs in the sandboxed interpreter.

It reads job.json from the working directory and deletes it before any of the code runs:
  {"token": ..., "code": ..., "setup": ..., "tests": [code, ...], "io": [[stdin, stdout], ...], "output_bytes": N}
Assert-style (`tests`): the code runs once as __main__, then `setup`, then each test in the same namespace;
a test passes when it runs to its end without an exception. If the code or the setup fails, none passes.
Stdin/stdout-style (`io`): for each pair the code runs afresh as __main__ with `stdin` as its standard
input; it passes when the code ends normally (or with exit status 0) and its standard output equals
`stdout` up to trailing whitespace on each line and trailing blank lines.

The last thing it does is write one line, `<token> <passed>`, to file descriptor 1 and leave with
os._exit. The token (from the parent, unknown to the code unless it digs through the interpreter's frames)
tells the parent that the harness itself reached its end: code that exits early, crashes the interpreter
or prints its own "report" earns nothing.
"""
from __future__ import annotations

import io
import json
import os
import sys
import types

# Bound before any of the code runs, so that replacing a builtin (compile, exec, ...) cannot fake a pass.
_write, _exit, _BaseException, _SystemExit = os.write, os._exit, BaseException, SystemExit
_compile, _exec, _Module, _modules, _sys = compile, exec, types.ModuleType, sys.modules, sys
_TextIOWrapper, _BytesIO = io.TextIOWrapper, io.BytesIO


class CappedBuffer(io.BytesIO):
    """An in-memory stream that refuses to grow past `limit` bytes (a program's captured output), and
    that cannot be closed."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def write(self, data) -> int:  # noqa: ANN001 - bytes-like
        if self.tell() + len(data) > self.limit:
            raise OSError("sandbox: output limit reached")
        return super().write(data)

    def close(self) -> None:
        """Stays open: the text stream over it closes it when dropped, or the code may close sys.stdout,
        and the harness still reads what was written."""


def text_stream(buffer: io.BytesIO) -> io.TextIOWrapper:
    """A text stream over `buffer` with a .buffer, as programs that read sys.stdin.buffer expect."""
    return _TextIOWrapper(buffer, encoding="utf-8", errors="replace", write_through=True)


def lines(text: str) -> list[str]:
    """Output as compared: lines without trailing whitespace, trailing blank lines dropped."""
    out = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while out and not out[-1]:
        out.pop()
    return out


def fresh_main() -> dict:
    """A new __main__ module's namespace, installed in sys.modules (so `import __main__`, pickling and
    dataclasses in the code see the code's own module, never this harness)."""
    module = _Module("__main__")
    _modules["__main__"] = module
    return module.__dict__


def compiled(source: str, name: str):  # noqa: ANN201 - a code object, or None when it does not compile
    try:
        return _compile(source, name, "exec")
    except _BaseException:
        return None


def run_asserts(code, setup, tests: list) -> int:  # noqa: ANN001 - code objects (None: does not compile)
    """How many tests run to their end after the code (and setup) ran once in their namespace."""
    scope = fresh_main()
    try:
        _exec(code, scope)
        if setup is not None:
            _exec(setup, scope)
    except _BaseException:
        return 0
    passed = 0
    for test in tests:
        if test is None:
            continue
        try:
            _exec(test, scope)
        except _BaseException:
            continue
        passed += 1
    return passed


def run_one_io(code, stdin: str, expected: list[str], limit: int) -> bool:  # noqa: ANN001 - a code object
    """Whether the program, given `stdin`, ends normally and prints the `expected` lines."""
    captured = CappedBuffer(limit)
    saved = _sys.stdin, _sys.stdout
    _sys.stdin, _sys.stdout = text_stream(_BytesIO(stdin.encode("utf-8"))), text_stream(captured)
    try:
        _exec(code, fresh_main())
        ended = True
    except _SystemExit as stop:
        ended = stop.code in (None, 0)
    except _BaseException:
        ended = False
    finally:
        _sys.stdin, _sys.stdout = saved
    return ended and lines(captured.getvalue().decode("utf-8", "replace")) == expected


def run_io(code, pairs: list[list[str]], limit: int) -> int:  # noqa: ANN001 - a code object
    """How many (stdin, stdout) pairs the program gets right, each run afresh."""
    passed = 0
    for stdin, expected in [(stdin, lines(stdout)) for stdin, stdout in pairs]:
        if run_one_io(code, stdin, expected, limit):
            passed += 1
    return passed


def main() -> None:
    """Read and delete the job, run it, report `<token> <passed>` on fd 1, leave at once."""
    with open("job.json", encoding="utf-8") as f:
        job = json.load(f)
    os.remove("job.json")
    token = job.pop("token")
    code = compiled(job["code"], "solution.py")
    setup = compiled(job["setup"], "<setup>") if job["setup"] else None
    tests = [compiled(test, f"<test {i + 1}>") for i, test in enumerate(job["tests"])]
    passed = 0
    if code is not None and (setup is not None or not job["setup"]):
        _sys.stdout = text_stream(CappedBuffer(job["output_bytes"]))  # the code's own prints in assert style
        passed = run_io(code, job["io"], job["output_bytes"]) if job["io"] else run_asserts(code, setup, tests)
    _write(1, f"\n{token} {passed}\n".encode())
    _exit(0)


if __name__ == "__main__":
    main()
