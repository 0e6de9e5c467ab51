"""`GRPOTrainer` in TRL's constructor shape, running sparselayer's engine: a TRL script switches by its import
and `layers=`.

`train()` runs `sparselayer.train` (run directory, checkpoints, resume, reporters) and returns transformers'
TrainOutput(global_step, training_loss, metrics), global_step in TRL's optimizer steps.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..errors import ConfigError
from ..tasks import Task, build_task, task_from_config
from ..tasks.rewards import BUILTIN_REWARDS
from ..train import default_output_dir, train
from .callbacks import CallbackRunner
from .mapping import Cadence, settings_of

BASE_MODEL_FOLDER = "base-model"  # where a loaded model is saved inside the run directory (vLLM and export read it)


def trl_module() -> Any:
    """The `trl` package, imported on first use: sparselayer itself never needs it."""
    try:
        import trl
    except ImportError:
        raise ConfigError("sparselayer.trl needs TRL for GRPOConfig: pip install 'sparselayer[trl]' (or pass a "
                          "sparselayer TrainConfig as args)") from None
    return trl


class GRPOTrainer:
    """TRL's GRPOTrainer(model, reward_funcs, args, train_dataset, eval_dataset, processing_class, callbacks),
    training `layers` only, with sparselayer's engine.

    model: a local model folder, or a loaded transformers model (saved to <output_dir>/base-model).
    reward_funcs: functions in TRL's convention, or sparselayer's built-in reward names (a reward model id is
    refused). args: a trl.GRPOConfig (every field honoured, refused with one line, or ignored: docs/trl.md) or a
    sparselayer TrainConfig; unset: TRL's GRPOConfig defaults. train_dataset/eval_dataset: a datasets.Dataset,
    a list of rows or a data file (without eval_dataset every row trains, as in TRL). processing_class: the
    tokenizer, which must agree with the model's. callbacks: transformers TrainerCallbacks. layers: the trained
    layers (default 16; with a TrainConfig, its own). sparselayer: further sparselayer settings by name
    (rollout="vllm", quant="nf4", ...), applied last.
    """

    def __init__(self, model: Any, reward_funcs: Any = None, args: Any = None, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None, callbacks: Sequence[Any] | None = None,
                 *, layers: str | int | None = None, **sparselayer: Any):
        rewards = reward_list(reward_funcs)
        if args is None:
            args = trl_module().GRPOConfig(output_dir=f"{_model_name(model)}-GRPO")
        if not isinstance(args, TrainConfig) and not hasattr(args, "generation_batch_size"):
            raise ConfigError(f"args: expected a trl.GRPOConfig or a sparselayer TrainConfig, got "
                              f"{type(args).__name__}")
        self.args, self.callbacks, self.processing_class = args, callbacks, processing_class
        self.task = dataset_task_of(train_dataset, eval_dataset)
        if isinstance(args, TrainConfig):
            self.config, self.cadence = self._from_train_config(args, rewards, layers, sparselayer)
        else:
            self.config, self.cadence = self._from_grpo_config(args, rewards, layers, eval_dataset, sparselayer)
        if train_dataset is not None:
            self._record_paths(train_dataset, eval_dataset)
        self.config.validate()  # before a loaded model is written out
        self.config.model.model = model_folder(model, processing_class, self.config)
        self.summary: dict[str, Any] | None = None

    # -- construction --------------------------------------------------------------------------------

    def _from_grpo_config(self, args: Any, rewards: list | None, layers: Any, eval_dataset: Any,
                          overrides: Mapping[str, Any]) -> tuple[TrainConfig, Cadence]:
        rows = len((self.task or task_from_config(TrainConfig().task)).train)
        values, cadence = settings_of(args, rows, has_eval=eval_dataset is not None)
        values.update(layers=str(layers if layers is not None else 16), reward=rewards)
        if eval_dataset is not None and self.task is not None:
            values["num_eval"] = max(1, len(self.task.test))  # TRL evaluates the whole eval_dataset
        _tf32(args.tf32)
        return TrainConfig.from_mapping({**values, **overrides}), cadence

    def _from_train_config(self, args: TrainConfig, rewards: list | None, layers: Any,
                           overrides: Mapping[str, Any]) -> tuple[TrainConfig, Cadence]:
        config = TrainConfig.from_mapping(dict(overrides), base=args)
        if layers is not None:
            config.model.layers = str(layers)
        if rewards is not None:
            if config.task.reward:
                raise ConfigError("reward_funcs and the TrainConfig's reward both name reward functions: give one")
            config.task.reward = rewards
        if self.task is not None and (config.task.dataset or config.task.task):
            raise ConfigError("train_dataset and the TrainConfig's dataset/task both name the data: give one")
        rl = config.rl
        per_batch = rl.num_iterations * rl.steps_per_generation
        rows = len((self.task or task_from_config(config.task)).train)
        batches = rows // rl.prompts_per_step
        cadence = Cadence(per_batch, config.run.max_steps * per_batch, batches, per_batch, False)
        return config, cadence

    def _record_paths(self, train_dataset: Any, eval_dataset: Any) -> None:
        """Data given as file paths is recorded in the run's config (so `sparselayer eval` finds it again)."""
        if isinstance(train_dataset, (str, Path)):
            self.config.task.dataset = str(train_dataset)
            held = eval_dataset if eval_dataset is not None else train_dataset
            self.config.task.eval_dataset = str(held) if isinstance(held, (str, Path)) else None

    # -- training ------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: bool | str | None = None) -> Any:
        """Run sparselayer's training; returns transformers' TrainOutput(global_step, training_loss, metrics).

        resume_from_checkpoint: True (or the run directory) continues the run in output_dir from its newest
        checkpoint. The full sparselayer summary is kept as `self.summary`."""
        from transformers.trainer_utils import TrainOutput

        resume = _resume(resume_from_checkpoint, self.config.run.output_dir)
        start = _completed_steps(self.config.run.output_dir) if resume else 0
        runner = CallbackRunner(self.callbacks, self.args, self.cadence, self.processing_class, start)
        runner.event("on_train_begin")
        t0 = time.perf_counter()
        self.summary = train(self.config, task=self.task, resume=resume, on_step=runner.on_step)
        runtime = time.perf_counter() - t0
        metrics = train_metrics(self.summary, runner, runtime)
        runner.log(metrics)
        runner.event("on_train_end")
        return TrainOutput(runner.state.global_step, metrics["train_loss"], metrics)

    def save_model(self, output_dir: str | None = None) -> Path:
        """Write a full transformers model folder with the trained layers merged (`sparselayer export`), to
        output_dir (unset: the run directory, as TRL saves there)."""
        from ..export import export_run

        run = self.config.run.output_dir
        return export_run(run, output_dir or run)


# -- helpers -----------------------------------------------------------------------------------------


def reward_list(reward_funcs: Any) -> list | None:
    """TRL's reward_funcs as sparselayer's reward list: callables and built-in names; a reward model (its id or a
    loaded one) is refused, since sparselayer runs reward functions only."""
    if reward_funcs is None:
        return None
    items = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    for item in items:
        if isinstance(item, str) and item not in BUILTIN_REWARDS:
            raise ConfigError(f"reward_funcs: {item!r} is not a built-in reward of sparselayer "
                              f"({', '.join(BUILTIN_REWARDS)}); TRL would load a reward model by that id, "
                              "sparselayer runs no reward models: pass a function")
        if not isinstance(item, str) and (not callable(item) or hasattr(item, "parameters")):
            raise ConfigError(f"reward_funcs: {type(item).__name__} is not a reward function; sparselayer runs no "
                              "reward models: pass a function")
    return items or None


def dataset_task_of(train_dataset: Any, eval_dataset: Any) -> Task | None:
    """The task of TRL's datasets: every train row trains (held-out rows: eval_dataset, else the same rows, which
    only an evaluation would read); None without a train_dataset (the settings' own task)."""
    if train_dataset is None:
        if eval_dataset is not None:
            raise ConfigError("eval_dataset without train_dataset: give both")
        return None
    return build_task(dataset=train_dataset, eval_dataset=eval_dataset if eval_dataset is not None else train_dataset)


def model_folder(model: Any, processing_class: Any, config: TrainConfig) -> str:
    """The local folder of `model`: a path as given, or a loaded model saved (with its tokenizer) to
    <output_dir>/base-model, where vLLM, `sparselayer eval` and `export` read it."""
    if isinstance(model, (str, Path)):
        if processing_class is not None:
            check_tokenizer(processing_class, str(model))
        return str(model)
    if hasattr(model, "peft_config"):
        raise ConfigError("model: a PEFT model is not supported; sparselayer trains whole layers: pass the base model")
    if not hasattr(model, "save_pretrained"):
        raise ConfigError(f"model: expected a local folder or a transformers model, got {type(model).__name__}")
    tokenizer = processing_class or _tokenizer_beside(model)
    config.run.output_dir = config.run.output_dir or default_output_dir(config)
    folder = Path(config.run.output_dir) / BASE_MODEL_FOLDER
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


def check_tokenizer(tokenizer: Any, folder: str) -> None:
    """ConfigError unless `tokenizer` agrees with the folder's own: same vocabulary and chat template (prompts are
    rendered with the folder's tokenizer)."""
    from transformers import AutoTokenizer

    if not hasattr(tokenizer, "get_vocab"):
        raise ConfigError(f"processing_class: expected a tokenizer, got {type(tokenizer).__name__} (no multimodal "
                          "processors)")
    try:
        own = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception:  # the model folder's own loading reports a missing or broken folder in one line
        return
    if own.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"processing_class: its vocabulary differs from the tokenizer in {folder}")
    if getattr(own, "chat_template", None) != getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"processing_class: its chat template differs from the tokenizer's in {folder}, which "
                          "renders the prompts: save it there (tokenizer.save_pretrained) or pass chat_template=FILE")


def _tokenizer_beside(model: Any) -> Any:
    from transformers import AutoTokenizer

    source = getattr(model, "name_or_path", "")
    if not source or not Path(source).is_dir():
        raise ConfigError("model: a loaded model needs processing_class (its tokenizer)")
    return AutoTokenizer.from_pretrained(source, local_files_only=True)


def _model_name(model: Any) -> str:
    name = str(model) if isinstance(model, (str, Path)) else getattr(model, "name_or_path", "") or "model"
    return Path(name).name or "model"


def _tf32(enabled: bool | None) -> None:
    """TrainingArguments.tf32, applied as transformers applies it."""
    if enabled is not None:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def _resume(value: bool | str | None, output_dir: str | None) -> bool:
    if value is None or value is False:
        return False
    if value is True:
        return True
    run, given = (Path(output_dir).resolve() if output_dir else None), Path(value).resolve()
    if run is not None and (given == run or run in given.parents):
        return True  # the run or a checkpoint inside it: sparselayer continues from the newest intact checkpoint
    raise ConfigError(f"resume_from_checkpoint={value!r}: sparselayer resumes the run in output_dir "
                      f"({output_dir}) from its newest checkpoint: pass True")


def _completed_steps(output_dir: str | None) -> int:
    """The step of the run's newest checkpoint (where a resumed run starts), 0 without one."""
    from ..runs import RunDir

    steps = RunDir(output_dir).checkpoint_steps() if output_dir else []
    return max(steps, default=0)


def train_metrics(summary: dict[str, Any], runner: CallbackRunner, runtime: float) -> dict[str, float]:
    """TrainOutput's metrics: TRL's train_runtime, train_steps_per_second, train_loss and epoch, and sparselayer's
    held-out accuracy at the start and the end where measured."""
    losses = runner.losses
    metrics = {"train_runtime": runtime,
               "train_steps_per_second": runner.state.global_step / runtime if runtime > 0 else 0.0,
               "train_loss": sum(losses) / len(losses) if losses else float("nan"),
               "epoch": float(runner.state.epoch or 0.0)}
    for ours, name in (("base_accuracy", "eval_accuracy_at_start"), ("final_accuracy", "eval_accuracy")):
        if ours in summary:
            metrics[name] = float(summary[ours])
    return metrics


__all__ = ["GRPOTrainer", "dataset_task_of", "reward_list", "trl_module"]
