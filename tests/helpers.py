"""Test helpers: a task with graded rewards so random tiny models get non-zero advantages."""
from __future__ import annotations

from sparselayer.tasks import ArithmeticTask
from sparselayer.tasks.base import Example


class DigitShareTask(ArithmeticTask):
    """Arithmetic prompts, reward = share of digit characters in the completion (varies within a group)."""

    def reward(self, completion: str, example: Example) -> float:
        return sum(ch.isdigit() for ch in completion) / max(1, len(completion))


def full_forward_logprobs(trainer, sb):
    """No-grad log-probs of the whole rollout batch through full forwards (the plain path: no prefix cache)."""
    from sparselayer.model.forward import FullForward

    forward = FullForward(trainer.model)
    return trainer.batch_logprobs(sb, forward, forward.prepare(sb.batch, sb.micro_batches), trainer.head)
