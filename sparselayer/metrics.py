"""What a step reports: phase timings that add up to the step time, and the metrics.jsonl line."""
from __future__ import annotations

import math
import time
from typing import Any

from .batch import StepBatch

PHASES = ("rollout_s", "reward_s", "logprob_s", "train_s", "push_s")


class PhaseTimer:
    """Consecutive phase marks: the phases partition the step, so they add up to step_time_s."""

    def __init__(self):
        self.last, self.phases = time.perf_counter(), dict.fromkeys(PHASES, 0.0)

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.last
        self.last = now


def step_metrics(step: int, sb: StepBatch, passes: list[dict[str, float]], phases: dict[str, float],
                 **extra: Any) -> dict[str, Any]:
    """The metrics.jsonl line of one step (`extra`: learning rate, push bytes, peak memory, ...)."""
    step_time = sum(phases.values())
    tokens = int(sb.batch.attention_mask.sum())
    return {
        "step": step,
        "reward_mean": float(sb.rewards.mean()),
        "reward_std": float(sb.rewards.std()),
        "accuracy": float(sb.correct.mean()),
        "loss": sum(p["loss"] for p in passes) / len(passes),
        "kl": passes[0]["kl"],
        "clip_ratio": sum(p["clip_ratio"] for p in passes) / len(passes),
        "grad_norm": passes[-1]["grad_norm"],
        "completion_length": float(sb.batch.completion_mask.sum(dim=1).float().mean()),
        "step_time_s": step_time,
        **phases,
        "tokens_per_s": tokens / step_time if step_time > 0 else math.nan,
        **extra,
    }
