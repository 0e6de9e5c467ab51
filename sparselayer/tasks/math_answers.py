"""Math answer checking: pull the final answer out of a completion and compare it with a reference.

Symbolic comparison goes through the maintained `math_verify` library; a normalized string/number
comparison covers what it cannot parse. Nothing here raises: a wrong or unreadable answer is False.
"""
from __future__ import annotations

import math
import re
import threading

from math_verify import parse, verify

# math_verify's timeouts use signal.alarm, which only works in the main thread; elsewhere we run
# it without a timeout and rely on the input guard below instead.
_TIMEOUT_SECONDS = 5
# Inputs sympy can spend minutes on (power towers, huge factorials, very long expressions) are
# compared as plain strings/numbers only.
_MAX_SYMBOLIC_CHARS = 200
_RISKY = re.compile(r"\^\s*\{[^{}]*\^|\^\s*\d+\s*\^|\d{3,}\s*!")

_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def _strip_thousands(text: str) -> str:
    """Remove thousands separators ("1,234,567" -> "1234567") without touching lists like "1, 2"."""
    return _THOUSANDS_COMMA.sub("", text)


def _last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if absent."""
    for match in reversed(list(re.finditer(r"\\(?:boxed|fbox)\s*\{", text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def _after_hashes(text: str) -> str | None:
    """First line of the text after the last `####`, stripped; None if absent or empty."""
    if "####" not in text:
        return None
    tail = text.rsplit("####", 1)[1].strip()
    line = tail.splitlines()[0].strip() if tail else ""
    return line or None


def reference_answer(text: str) -> str:
    """The checkable part of a reference answer: after the last `####` (GSM8K), else the last
    `\\boxed{}`, else the whole text, stripped; thousands commas are removed from numbers."""
    after = _after_hashes(text)
    if after is not None:
        return _strip_thousands(after)
    boxed = _last_boxed(text)
    if boxed is not None:
        return _strip_thousands(boxed)
    return _strip_thousands(text.strip())


def extract_answer(completion: str) -> str | None:
    """The final answer a completion gives: last `\\boxed{}`, else after the last `####`, else the
    last number in the text; None when there is none."""
    boxed = _last_boxed(completion)
    if boxed:
        return boxed
    after = _after_hashes(completion)
    if after is not None:
        return after.rstrip(".")
    numbers = list(_NUMBER.finditer(completion))
    return _number_text(completion, numbers[-1]) if numbers else None


def _number_text(text: str, match: re.Match[str]) -> str:
    """A matched number without thousands commas; a `-` right after a word or `)` is a hyphen, not a sign."""
    number = match.group()
    before = text[match.start() - 1] if match.start() > 0 else " "
    if number.startswith("-") and (before.isalnum() or before == ")"):
        number = number[1:]
    return _strip_thousands(number)


def _normalize(answer: str) -> str:
    """Canonical string form for comparison: no `$`, `\\text{}`, spaces, thousands commas or final dot."""
    text = _TEXT_WRAPPER.sub(r"\1", answer)
    text = text.replace("\\$", "").replace("$", "").replace("\\!", "").replace("\\,", "")
    text = _strip_thousands("".join(text.split()))
    return text.rstrip(".").lower()


def _as_number(text: str) -> float | None:
    """The value of a plain decimal number string, else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _plain_equal(predicted: str, reference: str) -> bool:
    """Normalized string equality, or numeric equality when both sides are plain numbers."""
    a, b = _normalize(predicted), _normalize(reference)
    if not a or not b:
        return False
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    return x is not None and y is not None and math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)


def _timeout() -> int | None:
    """Signal-based timeout for math_verify in the main thread; None (no timeout) elsewhere."""
    return _TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


def _symbolic(answer: str, timeout: int | None) -> list:
    """math_verify parse of one bare answer, keeping only sympy objects (empty if unparseable)."""
    if len(answer) > _MAX_SYMBOLIC_CHARS or _RISKY.search(answer):
        return []
    parsed = parse("\\boxed{" + answer + "}", parsing_timeout=timeout)
    return [p for p in parsed if not isinstance(p, str)]


def _symbolic_equal(predicted: str, reference: str) -> bool | None:
    """math_verify's verdict on predicted vs reference; None when either side cannot be parsed."""
    timeout = _timeout()
    gold = _symbolic(reference, timeout)
    target = _symbolic(predicted, timeout) if gold else []
    if not gold or not target:
        return None
    return bool(verify(gold, target, timeout_seconds=timeout))


def answers_match(completion: str, reference: str) -> bool:
    """Whether the completion's final answer equals the reference answer (GSM8K `####` or boxed).

    Never raises: unreadable inputs or math_verify failures fall back to plain comparison.
    """
    try:
        predicted = extract_answer(completion or "")
        expected = reference_answer(reference or "")
        if not predicted or not expected:
            return False
        if _plain_equal(predicted, expected):
            return True
        try:
            verdict = _symbolic_equal(predicted, expected)
        except Exception:  # math_verify internals: treat as "could not parse"
            verdict = None
        return bool(verdict)
    except Exception:
        return False
