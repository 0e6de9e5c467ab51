"""A training run: run directory, resume, progress bar, checkpoints, base/final evaluation, summary."""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .config import TrainConfig
from .errors import RunError
from .evaluate import evaluate
from .rollout.base import RolloutEngine
from .runs import RunDir
from .tasks import Task
from .trainer import Trainer


def default_output_dir(config: TrainConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"layers-{config.model.layers.replace(',', '_')}-{stamp}")


def save_checkpoint(trainer: Trainer, run: RunDir) -> Path:
    """Only what changes: trained tensors, optimizer and scheduler, RNG, data position."""
    state = {"optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
             "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    meta = {"data_position": trainer.step_count * trainer.config.rl.prompts_per_step,
            "layers": trainer.layers, "trained_tensors": len(trainer.trained)}
    return run.save_checkpoint(trainer.step_count, trainer.trained_state(), state, meta,
                               keep=trainer.config.run.save_total_limit)


def restore_checkpoint(trainer: Trainer, run: RunDir) -> int:
    """Load the latest checkpoint into the trainer; return its step (0 if there is none)."""
    path = run.latest_checkpoint()
    if path is None:
        return 0
    tensors, state, meta = RunDir.load_checkpoint(path)
    if set(tensors) != set(trainer.trained):
        raise RunError(f"checkpoint {path} holds other layers than --layers {trainer.config.model.layers}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            trainer.trained[name].copy_(tensor)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    trainer.step_count = int(meta["step"])
    trainer.engine.update_weights(trainer.trained_state().items())
    return trainer.step_count


def train(config: TrainConfig, task: Task | None = None, engine: RolloutEngine | None = None,
          resume: bool = False, on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run GRPO to `max_steps`, resumable; returns the summary also written to summary.json."""
    config.validate()
    config.run.output_dir = config.run.output_dir or default_output_dir(config)
    run = RunDir(config.run.output_dir)
    if run.has_run() and not resume:
        raise RunError(f"{run.path} already holds a run: pass --resume to continue it, or pick another --output-dir")
    trainer = Trainer(config, task=task, engine=engine)
    try:
        return _run(trainer, run, resume, on_step)
    finally:
        if engine is None:  # the trainer built it: free it (a sweep builds one per run)
            trainer.engine.close()


def _run(trainer: Trainer, run: RunDir, resume: bool,
         on_step: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    """Train to max_steps from the latest checkpoint (resume) or from scratch; evaluate; write the summary."""
    config = trainer.config
    run.create()
    run.write_config(config.to_dict())
    start = restore_checkpoint(trainer, run) if resume else 0
    run.truncate_metrics(start)
    summary = _load_summary_seed(run, start)
    if config.run.eval_at_start and "base_accuracy" not in summary:
        summary["base_accuracy"] = _evaluate(trainer)["accuracy"]
        run.write_summary(summary)
    t0 = time.perf_counter()
    bar = tqdm(total=config.run.max_steps, initial=start, disable=not config.run.progress,
               desc=f"GRPO {trainer.label}", unit="step", dynamic_ncols=True)
    while trainer.step_count < config.run.max_steps:
        metrics = trainer.step()
        run.append_metrics(metrics)
        if trainer.step_count % config.run.save_steps == 0 or trainer.step_count == config.run.max_steps:
            save_checkpoint(trainer, run)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                        s_per_step=f"{metrics['step_time_s']:.2f}")
        bar.update(1)
        if on_step:
            on_step(metrics)
    bar.close()
    summary.update({"steps": trainer.step_count, "layers": trainer.label, "output_dir": str(run.path),
                    "train_time_s": time.perf_counter() - t0})
    if config.run.eval_at_end:
        summary["final_eval"] = _evaluate(trainer)
        summary["final_accuracy"] = summary["final_eval"]["accuracy"]
    run.write_summary(summary)
    return summary


def _evaluate(trainer: Trainer) -> dict[str, Any]:
    return evaluate(trainer.engine, trainer.tokenizer, trainer.task, num_examples=trainer.config.task.num_eval,
                    k=0, max_new_tokens=trainer.max_completion_length)


def _load_summary_seed(run: RunDir, start: int) -> dict[str, Any]:
    """Keep the base accuracy measured before the run was interrupted."""
    old = run.read_summary() if start else {}
    return {k: old[k] for k in ("base_accuracy",) if k in old}
