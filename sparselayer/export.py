"""Turn a run directory back into a model: merge the trained layer(s) into the base and save a full HF folder."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from .config import TrainConfig
from .errors import RunError
from .model.layout import load_model
from .runs import RunDir, warn
from .tasks import Task, build_task, task_from_config
from .tasks.chat import PromptRenderer


def is_run_dir(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / "config.yaml").is_file()


def load_run(path: str | Path, device: str = "auto") -> tuple[nn.Module, object, TrainConfig, int]:
    """Base model with the newest intact checkpoint's trained tensors loaded; also the run's config and step.

    An unreadable newer checkpoint is skipped with one warning line on stderr (nothing in the run is
    changed); RunError when no checkpoint is intact.
    """
    run = RunDir(path)
    config = TrainConfig.from_mapping(run.read_config())
    ckpt = run.newest_intact(mmap=True)  # the optimizer state is only checked: map it, do not read it
    if ckpt is None:
        raise RunError(f"run directory {path} holds no checkpoint yet")
    if ckpt.skipped:
        warn(ckpt.skipped_note())
    model, tokenizer = load_model(config.model.model, config.model.dtype, device, config.model.attn_implementation)
    state = model.state_dict()
    unknown = [n for n in ckpt.tensors if n not in state]
    if unknown:
        raise RunError(f"checkpoint {ckpt.path} does not fit the base model (unknown tensor {unknown[0]})")
    model.load_state_dict(ckpt.tensors, strict=False)
    return model, tokenizer, config, ckpt.step


def load_for_eval(path: str | Path | None) -> tuple[nn.Module, object, Task, str, PromptRenderer]:
    """Model, tokenizer, the task it was trained on (built-in default otherwise), a source label, and the
    prompt renderer of its training (chat template, system prompt, template variables)."""
    if is_run_dir(path):
        model, tokenizer, config, step = load_run(path)
        t = config.task  # accuracy needs the data (or the environment), not the reward functions: not run here
        task = task_from_config(dataclasses.replace(t, reward=None, reward_weights=None))
        return model, tokenizer, task, f"{path} (step {step})", PromptRenderer.from_config(tokenizer, t)
    model, tokenizer = load_model(path)
    return model, tokenizer, build_task(), str(path) if path else "embedded default", PromptRenderer(tokenizer)


def export_run(run_dir: str | Path, output: str | Path) -> Path:
    """Write a full HF model folder (weights, config, tokenizer) with the trained layer(s) merged."""
    model, tokenizer, _, _ = load_run(run_dir, device="cpu")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
