"""The built-in multi-turn task `chain`: a running total, one addition per turn, in the embedded model's
`aaa+bbb=` format.

Each turn shows the running total (mod 1000) and the next operand, `579+111=`; the action is their sum
(the true sum, not the carry-dropped one the embedded model's corpus also holds). Whatever sum the model
states becomes the next turn's total (mod 1000): a wrong sum carries on into the rest of the episode,
so an early mistake changes every later state. The episode succeeds when every turn is right. Reward:
1 at the end of a successful episode (default), or 1/turns for each right turn (`per_turn_reward`); an
action that is not a number ends the episode.

The operands are fixed by the seed along the correct path: in a training episode every (correct total,
operand) pair lies outside the arithmetic task's held-out region, in a held-out episode (seed >=
HELD_OUT_SEED) inside it, so no held-out episode is ever trained on.
"""
from __future__ import annotations

import random

from ..arithmetic import format_prompt, is_held_out, parse_int
from .base import Environment, StepResult, is_held_out_seed

MODULUS = 1000  # the running total keeps three digits, as the embedded model's operands do


def chain_operands(seed: int, turns: int) -> tuple[int, list[int]]:
    """(start total, one operand per turn) of episode `seed`: each (correct running total, operand) pair in
    the held-out region exactly when the seed is a held-out one."""
    rng = random.Random(seed)
    held_out = is_held_out_seed(seed)
    total, operands = rng.randrange(MODULUS), []
    start = total
    for _ in range(turns):
        b = rng.randrange(MODULUS)
        while is_held_out(total, b) != held_out:
            b = rng.randrange(MODULUS)
        operands.append(b)
        total = (total + b) % MODULUS
    return start, operands


class ChainEnv(Environment):
    """`turns` additions onto a running total; reward at the end (default) or 1/turns per right turn."""

    suggested_max_completion_length = 8

    def __init__(self, turns: int = 3, per_turn_reward: bool = False):
        if turns < 1:
            raise ValueError(f"a chain needs at least one turn, got {turns}")
        self.turns, self.per_turn_reward = turns, per_turn_reward
        self.total, self.operands, self.turn, self.all_right = 0, [], 0, True

    def reset(self, seed: int) -> str:
        self.total, self.operands = chain_operands(seed, self.turns)
        self.turn, self.all_right = 0, True
        return self.observation()

    def observation(self) -> str:
        """The current turn's prompt: the running total and the next operand, `579+111=`."""
        return format_prompt(self.total, self.operands[self.turn])

    def step(self, action: str) -> StepResult:
        if self.turn >= self.turns:
            raise RuntimeError("the episode is over: reset the environment first")
        stated = parse_int(action)
        if stated is None:  # not a number: the episode ends, failed
            self.turn, self.all_right = self.turns, False
            return StepResult("", 0.0, True, False)
        right = stated == self.total + self.operands[self.turn]
        self.all_right = self.all_right and right
        self.total, self.turn = stated % MODULUS, self.turn + 1
        done = self.turn == self.turns
        if self.per_turn_reward:
            reward = 1.0 / self.turns if right else 0.0
        else:
            reward = 1.0 if done and self.all_right else 0.0
        return StepResult("" if done else self.observation(), reward, done, self.all_right if done else None)
