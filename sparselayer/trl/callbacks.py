"""transformers TrainerCallbacks driven by a sparselayer run: on_train_begin, then after every rollout batch
on_step_end (and on_log when a logging step is reached, on_evaluate with a held-out accuracy), on_train_end.

state.global_step counts TRL's optimizer steps: a rollout batch advances it by num_iterations x
steps_per_generation, and the events fire once per rollout batch (with TRL's defaults, once per optimizer
step, as in TRL). `control.should_training_stop` set by any callback stops the run after that batch, on a
checkpoint. Callbacks receive the GRPOConfig (or TrainConfig) as `args` and `processing_class`; no model or
optimizer objects (they live inside the run).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .mapping import Cadence

# metrics.jsonl keys that TRL logs under another name
TRL_NAMES = {"reward_mean": "reward", "reward_std": "reward_std", "completion_length": "completions/mean_length",
             "learning_rate": "learning_rate", "grad_norm": "grad_norm", "kl": "kl",
             "clip_ratio": "clip_ratio/region_mean"}


class CallbackRunner:
    """Holds the TrainerState and TrainerControl and calls every callback's events in order."""

    def __init__(self, callbacks: Sequence[Any] | None, args: Any, cadence: Cadence, processing_class: Any = None,
                 start_step: int = 0):
        from transformers.trainer_callback import TrainerControl, TrainerState

        self.callbacks = [cb() if isinstance(cb, type) else cb for cb in callbacks or ()]
        self.args, self.cadence, self.processing_class = args, cadence, processing_class
        self.state = TrainerState(max_steps=cadence.max_steps, logging_steps=cadence.logging_steps,
                                  num_train_epochs=math.ceil(cadence.max_steps / max(1, self._per_epoch())))
        self.state.global_step = start_step * cadence.optimizer_steps_per_batch
        self.control = TrainerControl()
        self.losses: list[float] = []

    def event(self, name: str, **kwargs: Any) -> None:
        """Call `name` on every callback; a callback that returns a TrainerControl replaces the current one."""
        for callback in self.callbacks:
            result = getattr(callback, name)(self.args, self.state, self.control,
                                             processing_class=self.processing_class, **kwargs)
            if result is not None:
                self.control = result

    def on_step(self, metrics: dict[str, Any]) -> bool:
        """sparselayer's per-step hook: advance the state, fire the events; True stops the run."""
        before = self.state.global_step
        self.state.global_step += self.cadence.optimizer_steps_per_batch
        self.state.epoch = metrics["step"] / max(1, self.cadence.batches_per_epoch)
        self.losses.append(float(metrics["loss"]))
        self.event("on_step_end")
        if self._logging_due(before, metrics["step"]):
            self.log(trl_logs(metrics, self.state.epoch))
        if "eval_accuracy" in metrics:
            self.event("on_evaluate", metrics={"eval_accuracy": metrics["eval_accuracy"]})
        return bool(self.control.should_training_stop)

    def log(self, logs: dict[str, Any]) -> None:
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.event("on_log", logs=logs)

    def _logging_due(self, before: int, step: int) -> bool:
        every = self.cadence.logging_steps
        if step == 1 and self.cadence.logging_first_step:
            return True
        return every > 0 and before // every != self.state.global_step // every

    def _per_epoch(self) -> int:
        return self.cadence.batches_per_epoch * self.cadence.optimizer_steps_per_batch


def trl_logs(metrics: dict[str, Any], epoch: float) -> dict[str, Any]:
    """A step's metrics line with TRL's names added for the keys TRL logs under another name, and the epoch."""
    logs = dict(metrics)
    logs.update({trl: metrics[ours] for ours, trl in TRL_NAMES.items() if ours in metrics})
    logs["epoch"] = epoch
    return logs
