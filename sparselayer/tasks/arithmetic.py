"""The built-in task: multi-digit addition with an exact reward and a held-out split.

A pair (a, b) belongs to the held-out region when a fixed hash of it falls in 1/50 of the space,
so no training prompt (and no pretraining sample of the embedded model) is ever a test prompt.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from functools import cached_property

from .base import Example, Task

HELD_OUT_MODULUS = 50


def is_held_out(a: int, b: int) -> bool:
    """Whether the pair (a, b) lies in the held-out region (about 2% of all pairs)."""
    return ((a * 1000 + b) * 2654435761 % 2**32) % HELD_OUT_MODULUS == 0


def format_prompt(a: int, b: int, digits: int = 3) -> str:
    """The prompt for a + b, operands zero-padded to a fixed width so digits line up: 007+123=."""
    return f"{a:0{digits}d}+{b:0{digits}d}="


def format_answer(value: int, digits: int = 3) -> str:
    """The completion for a sum: zero-padded to digits+1 places (0130); any leading zeros are accepted."""
    return f"{value:0{digits + 1}d}"


def carryless_sum(a: int, b: int) -> int:
    """Digit-wise sum with every carry dropped: the typical error the pretraining corpus contains."""
    out, place = 0, 1
    while a or b:
        out += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return out


def sample_pair(rng: random.Random, max_value: int, held_out: bool) -> tuple[int, int]:
    """A random pair from the training (held_out=False) or held-out region."""
    while True:
        a, b = rng.randint(0, max_value), rng.randint(0, max_value)
        if is_held_out(a, b) == held_out:
            return a, b


def parse_int(completion: str) -> int | None:
    """The integer a completion states, or None unless it is nothing but digits (strict)."""
    text = completion.strip()
    return int(text) if text.isascii() and text.isdigit() else None


class ArithmeticTask(Task):
    """Addition of two numbers below 10**digits; reward 1 for the exact sum, else 0."""

    name = "arithmetic"
    suggested_max_completion_length = 8

    def __init__(self, digits: int = 3, num_train: int = 20000, num_test: int = 500, seed: int = 0):
        self.digits, self.max_value = digits, 10**digits - 1
        self.num_train, self.num_test, self.seed = num_train, num_test, seed

    def _examples(self, n: int, held_out: bool, seed: int) -> list[Example]:
        rng = random.Random(seed)
        pairs = [sample_pair(rng, self.max_value, held_out) for _ in range(n)]
        return [Example(format_prompt(a, b, self.digits), str(a + b)) for a, b in pairs]

    @cached_property
    def train(self) -> Sequence[Example]:
        return self._examples(self.num_train, False, self.seed)

    @cached_property
    def test(self) -> Sequence[Example]:
        return self._examples(self.num_test, True, 10_000 + self.seed)

    def is_correct(self, completion: str, example: Example) -> bool:
        return parse_int(completion) == int(example.answer)
