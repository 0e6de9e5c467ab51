"""What a step reports: phase timings that add up to the step time, and the metrics.jsonl line."""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
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
        **reward_function_metrics(sb.function_rewards),
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


def reward_function_metrics(function_rewards: Mapping[str, Sequence[float | None]]) -> dict[str, float]:
    """rewards/<name>/mean and rewards/<name>/std of each reward function (as TRL logs them) over the
    completions it applied to (not None); the sample std, NaN below two values, the mean NaN with none."""
    out = {}
    for name, values in function_rewards.items():
        scored = [float(v) for v in values if v is not None]
        out[f"rewards/{name}/mean"] = statistics.fmean(scored) if scored else math.nan
        out[f"rewards/{name}/std"] = statistics.stdev(scored) if len(scored) > 1 else math.nan
    return out


def completion_rows(sb: StepBatch, step: int, prompts: int, num_generations: int) -> list[dict[str, Any]]:
    """Every completion of the step's first `prompts` prompts (their GRPO groups), with reward, advantage and
    each reward function's value: the rows --log-completions writes to completions.jsonl and the loggers."""
    rows = []
    for i in range(min(len(sb.completions), prompts * num_generations)):
        rows.append({"step": step, "prompt": sb.prompts[i], "completion": sb.completions[i],
                     "reward": float(sb.rewards[i]), "advantage": float(sb.advantages[i]),
                     **{f"rewards/{name}": values[i] for name, values in sb.function_rewards.items()}})
    return rows
