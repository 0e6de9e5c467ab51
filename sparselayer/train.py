"""A training run: run directory, resume, progress bar, checkpoints, base/final evaluation, summary."""
from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .config import TrainConfig
from .distributed import World, broadcast_object, gather_objects, launched_size, rank_errors, setup, teardown, world
from .errors import RunError
from .evaluate import evaluate
from .metrics import completion_rows
from .reporting import Reporters, build_reporters, check_reporters
from .rollout.base import RolloutEngine
from .runs import RunDir, python_rng_state, warn
from .tasks import Task
from .trainer import Trainer

StepHook = Callable[[dict[str, Any]], bool | None]  # on_step: called with each step's metrics; True stops
COMPLETION_PROMPTS = 2  # prompts (each with its whole GRPO group) in a --log-completions sample


def default_output_dir(config: TrainConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"layers-{config.model.layers.replace(',', '_')}-{stamp}")


def save_checkpoint(trainer: Trainer, run: RunDir) -> Path | None:
    """Only what changes: trained tensors, optimizer and scheduler, RNG, data position.

    Under torchrun every rank calls it: each rank's RNG state is gathered into `rank_rng`, and rank 0
    alone writes (the weights and optimizer state are identical on every rank); other ranks get None.
    """
    state = {"optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
             "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    meta = {"data_position": trainer.step_count * trainer.config.rl.prompts_per_step,
            "layers": trainer.layers, "trained_tensors": len(trainer.trained)}
    if trainer.world.size > 1:
        state["rank_rng"] = gather_objects({"torch_rng": state["torch_rng"], "python_rng": state["python_rng"]})
        meta["world_size"] = trainer.world.size
    if not trainer.world.is_main:
        return None
    return run.save_checkpoint(trainer.step_count, trainer.trained_state(), state, meta,
                               keep=trainer.config.run.save_total_limit)


def restore_checkpoint(trainer: Trainer, run: RunDir) -> int:
    """Load the newest intact checkpoint into the trainer; return its step (0 if there is none).

    Unreadable newer checkpoints (truncated, corrupt, not plain data) are set aside as
    checkpoints/unreadable-step-N with one warning line, so the resumed run retrains those steps and
    its saving and pruning never count them as good ones. Under torchrun rank 0 reads it and sends it to
    the others (their nodes need not see the run directory).
    """
    ckpt = run.newest_intact() if trainer.world.is_main else None
    if ckpt is not None and set(ckpt.tensors) != set(trainer.trained):
        raise RunError(f"checkpoint {ckpt.path} holds other layers than --layers {trainer.config.model.layers}")
    if ckpt is not None and ckpt.skipped:
        aside = [run.set_aside(path).name for path, _ in ckpt.skipped]
        warn(f"{ckpt.skipped_note()}; set aside as {', '.join(aside)}")
    ckpt = broadcast_object(ckpt)
    if ckpt is None:
        return 0
    with torch.no_grad():
        for name, tensor in ckpt.tensors.items():
            trainer.trained[name].copy_(tensor)
    try:
        trainer.optimizer.load_state_dict(ckpt.state["optimizer"])
        trainer.scheduler.load_state_dict(ckpt.state["scheduler"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RunError(f"checkpoint {ckpt.path} does not fit this run's optimizer "
                       f"(--optim {trainer.config.rl.optim}): {str(exc).splitlines()[0]}") from None
    rng = _rank_rng(ckpt.state, ckpt.meta, trainer.world)
    torch.set_rng_state(rng["torch_rng"])
    random.setstate(python_rng_state(rng["python_rng"]))
    trainer.step_count = ckpt.step
    trainer.engine.update_weights(trainer.trained_state().items())
    return trainer.step_count


def train(config: TrainConfig, task: Task | None = None, engine: RolloutEngine | None = None,
          resume: bool = False, on_step: StepHook | None = None) -> dict[str, Any]:
    """Run GRPO to `max_steps`, resumable; returns the summary also written to summary.json.

    The run folder is locked for the whole run (a second process is refused with this one's PID), and
    a full disk ends the run with one line (RunError) that leaves the last checkpoint intact. `on_step` gets each
    step's metrics line; a true return stops the run after that step, on a checkpoint, then evaluates and
    summarises as at the end (under torchrun every rank must return the same).
    """
    config.validate()
    joins = launched_size() > 1 and world().size == 1  # under torchrun: this call joins the job, and leaves it
    me = setup(config.model.device)
    try:
        with rank_errors():  # under torchrun: a failure names its rank; torchrun stops the other ranks
            return _locked_run(config, me, task, engine, resume, on_step)
    finally:
        if joins:
            teardown()


def _locked_run(config: TrainConfig, me: World, task: Task | None, engine: RolloutEngine | None, resume: bool,
                on_step: StepHook | None) -> dict[str, Any]:
    """Lock the run directory (rank 0 under torchrun: it alone writes there), build the trainer, run."""
    config.run.output_dir = broadcast_object(config.run.output_dir or default_output_dir(config))
    run = RunDir(config.run.output_dir)
    lock = run.lock() if me.is_main else contextlib.nullcontext()
    with run.disk_errors(), lock:  # a second process on this folder is refused before it writes
        if me.is_main and run.has_run() and not resume:
            raise RunError(f"{run.path} already holds a run: pass --resume to continue it, or pick another "
                           "--output-dir")
        check_reporters(config.run.report_to)  # an uninstalled logger is refused before the model loads
        trainer = Trainer(config, task=task, engine=engine)
        try:
            return _run(trainer, run, resume, on_step)
        finally:
            if engine is None:  # the trainer built it: free it (a sweep builds one per run)
                trainer.engine.close()


def _run(trainer: Trainer, run: RunDir, resume: bool,
         on_step: StepHook | None) -> dict[str, Any]:
    """Train to max_steps from the latest checkpoint (resume) or from scratch; evaluate; write the summary."""
    config, main = trainer.config, trainer.world.is_main  # under torchrun rank 0 alone writes the run directory
    if main:
        run.create()
        run.write_config(config.to_dict())
    start = restore_checkpoint(trainer, run) if resume else 0
    if main:
        run.truncate_metrics(start)
    summary = broadcast_object(_load_summary_seed(run, start) if main else None)
    reporters = build_reporters(config.run.report_to if main else [], run.path, config.to_dict())
    try:
        if config.run.eval_at_start and "base_accuracy" not in summary:
            summary["base_accuracy"] = _evaluate(trainer)["accuracy"]
            if main:
                run.write_summary(summary)
            reporters.log({"eval_accuracy": summary["base_accuracy"]}, start)
        t0 = time.perf_counter()
        _train_steps(trainer, run, reporters, on_step)
        summary.update({"steps": trainer.step_count, "layers": trainer.label, "output_dir": str(run.path),
                        "train_time_s": time.perf_counter() - t0})
        if config.run.eval_at_end:
            summary["final_eval"] = _evaluate(trainer)
            summary["final_accuracy"] = summary["final_eval"]["accuracy"]
            reporters.log({"eval_accuracy": summary["final_accuracy"]}, trainer.step_count)
        if main:
            summary.update(eval_curve(run, summary))
            run.write_summary(summary)
    finally:
        reporters.close()
    return summary


def _train_steps(trainer: Trainer, run: RunDir, reporters: Reporters,
                 on_step: StepHook | None) -> None:
    """The step loop: metrics (with held-out accuracy every --eval-steps), sample completions every
    --log-completions steps, checkpoints every --save-steps and at the end, the progress bar."""
    rc = trainer.config.run
    main = trainer.world.is_main
    bar = tqdm(total=rc.max_steps, initial=trainer.step_count, disable=not (rc.progress and main),
               desc=f"GRPO {trainer.label}", unit="step", dynamic_ncols=True)
    while trainer.step_count < rc.max_steps:
        metrics = trainer.step()
        step = trainer.step_count
        if rc.eval_steps and step % rc.eval_steps == 0 and (step < rc.max_steps or not rc.eval_at_end):
            metrics["eval_accuracy"] = _evaluate(trainer)["accuracy"]
        if main:
            run.append_metrics(metrics)
        reporters.log(metrics, step)
        if main and rc.log_completions and step % rc.log_completions == 0 and trainer.last_batch is not None:
            rows = completion_rows(trainer.last_batch, step, COMPLETION_PROMPTS, trainer.config.rl.num_generations)
            run.append_completions(rows)
            reporters.log_table("completions", rows, step)
        if step % rc.save_steps == 0 or step == rc.max_steps:
            save_checkpoint(trainer, run)  # every rank: their RNG states are gathered; rank 0 writes
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                        s_per_step=f"{metrics['step_time_s']:.2f}")
        bar.update(1)
        if on_step and on_step(metrics):  # the caller stops the run here (sparselayer.trl: should_training_stop)
            if step % rc.save_steps and step != rc.max_steps:
                save_checkpoint(trainer, run)  # a stopped run ends on a checkpoint: resume=True continues it
            break
    bar.close()


def eval_curve(run: RunDir, summary: dict[str, Any]) -> dict[str, Any]:
    """Held-out accuracy by step (base at 0, every --eval-steps, final) and its best point, for the summary."""
    points = [(0, summary["base_accuracy"])] if "base_accuracy" in summary else []
    points += [(r["step"], r["eval_accuracy"]) for r in run.read_metrics() if "eval_accuracy" in r]
    if "final_accuracy" in summary:
        points.append((summary["steps"], summary["final_accuracy"]))
    if not points:
        return {}
    best = max(points, key=lambda p: p[1])  # the earliest step of the best accuracy
    return {"eval_curve": [{"step": s, "accuracy": a} for s, a in points],
            "best_eval": {"step": best[0], "accuracy": best[1]}}


def _rank_rng(state: dict[str, Any], meta: dict[str, Any], me: World) -> dict[str, Any]:
    """This rank's saved RNG state: its own entry of `rank_rng` when the checkpoint was written by as many
    ranks as run now (then a resume continues exactly); else rank 0's, with a warning under torchrun."""
    ranks = state.get("rank_rng")
    if ranks is not None and len(ranks) == me.size:
        return ranks[me.rank]
    saved = meta.get("world_size", 1)
    if me.size > 1 and me.is_main:
        warn(f"the checkpoint was written by {saved} rank(s), this run has {me.size}: every rank continues "
             "from rank 0's random state, so rollouts differ from an uninterrupted run")
    return {"torch_rng": state["torch_rng"], "python_rng": state["python_rng"]}


def _evaluate(trainer: Trainer) -> dict[str, Any]:
    return evaluate(trainer.engine, trainer.tokenizer, trainer.task, num_examples=trainer.config.task.num_eval,
                    k=0, max_new_tokens=trainer.max_completion_length, renderer=trainer.renderer)


def _load_summary_seed(run: RunDir, start: int) -> dict[str, Any]:
    """Keep the base accuracy measured before the run was interrupted."""
    old = run.read_summary() if start else {}
    return {k: old[k] for k in ("base_accuracy",) if k in old}
