"""A TRL GRPOConfig as sparselayer settings: every field of `fields.FIELDS` that maps is converted here, a
refused field set to anything but TRL's default is one ConfigError line naming it.

Units: TRL counts optimizer steps; a sparselayer step is one rollout batch, which makes num_iterations x
steps_per_generation optimizer steps (`Cadence.optimizer_steps_per_batch`). Step counts (max_steps, save_steps,
eval_steps) are converted to rollout batches, and refused where they do not divide.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from ..config import REPORTERS
from ..errors import ConfigError
from ..objective import LOSS_TYPES
from .fields import FIELDS, REFUSED

# sparselayer setting <- GRPOConfig field, where only the name differs (or not even that)
RENAMED = {"vllm_gpu_memory_utilization": "gpu_memory_utilization", "vllm_max_model_length": "max_model_len",
           "vllm_enable_sleep_mode": "sleep_mode", "eval_on_start": "eval_at_start"}
SAME_NAME = ("learning_rate", "weight_decay", "num_generations", "max_completion_length", "temperature", "top_p",
             "beta", "num_iterations", "epsilon", "epsilon_high", "sapo_temperature_neg", "sapo_temperature_pos",
             "importance_sampling_level", "scale_rewards", "use_bias_correction_kl", "seed",
             "gradient_checkpointing", "vllm_tensor_parallel_size", "vllm_importance_sampling_correction",
             "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min")
SCHEDULERS = {"constant": "constant", "constant_with_warmup": "constant", "linear": "linear", "cosine": "cosine"}
OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_8bit": "adamw8bit",
              "adamw_bnb_8bit": "adamw8bit", "paged_adamw_8bit": "adamw8bit"}
MODEL_INIT_KEYS = ("dtype", "torch_dtype", "attn_implementation")


@dataclass(frozen=True)
class Cadence:
    """TRL's step unit and logging rhythm, which the front door's callbacks follow."""

    optimizer_steps_per_batch: int  # num_iterations x steps_per_generation: TRL's global_step per rollout batch
    max_steps: int  # in TRL's optimizer steps
    batches_per_epoch: int  # rollout batches in one pass over the training rows
    logging_steps: int  # callbacks' on_log every this many optimizer steps; 0: never
    logging_first_step: bool


def refuse(name: str, value: Any, why: str) -> ConfigError:
    """The one line for a GRPOConfig value sparselayer cannot honour."""
    return ConfigError(f"GRPOConfig.{name}={value!r} is not supported by sparselayer ({why})")


def field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def check_fields(args: Any) -> None:
    """ConfigError for the first refused field set to a non-default value, and for a field this mapping does not
    know (a TRL newer than 1.16) that is set."""
    for field in dataclasses.fields(args):
        value, default = getattr(args, field.name), field_default(field)
        if field.name not in FIELDS:
            if value != default:
                raise refuse(field.name, value, "a field sparselayer's TRL mapping, written for TRL 1.16, does not "
                                                "know")
        elif FIELDS[field.name].kind == REFUSED and value != default:
            raise refuse(field.name, value, FIELDS[field.name].note)


def settings_of(args: Any, training_rows: int, has_eval: bool) -> tuple[dict[str, Any], Cadence]:
    """The sparselayer settings (TrainConfig keys) of a GRPOConfig, and the cadence of its callbacks.

    training_rows: rows of the training data (epochs, per-epoch saving and evaluation); has_eval: whether an
    eval_dataset was given (evaluation settings need one, as in TRL)."""
    check_fields(args)
    values: dict[str, Any] = {name: getattr(args, name) for name in SAME_NAME}
    values.update({ours: getattr(args, theirs) for theirs, ours in RENAMED.items()})
    values.update(_geometry(args))
    per_batch = args.num_iterations * values["steps_per_generation"]
    batches_per_epoch = training_rows // values["prompts_per_step"]
    values["max_steps"], trl_steps = _length(args, per_batch, batches_per_epoch, values["prompts_per_step"])
    values.update(**_objective(args), **_precision(args), **_optimizer(args, trl_steps), **_rollout(args))
    logging_steps = _logging_steps(args, trl_steps)
    values.update(_bookkeeping(args, per_batch, batches_per_epoch, values["max_steps"], logging_steps, has_eval))
    return values, Cadence(per_batch, trl_steps, batches_per_epoch, logging_steps, bool(args.logging_first_step))


def _value(x: Any) -> Any:
    """An enum's value (transformers keeps some choices as enums), else the value itself."""
    return getattr(x, "value", x)


def _geometry(args: Any) -> dict[str, Any]:
    """TRL's generation batch (per_device_train_batch_size x processes x steps_per_generation completions) as
    prompts per rollout batch, and its optimizer steps per rollout batch (steps_per_generation /
    gradient_accumulation_steps), each a whole number or refused."""
    completions, n = args.generation_batch_size, args.num_generations
    if completions % n:
        raise refuse("generation_batch_size", completions, f"not a multiple of num_generations={n}")
    spg, accumulation = args.steps_per_generation, args.gradient_accumulation_steps
    if spg % accumulation:
        raise refuse("steps_per_generation", spg, f"each sparselayer optimizer step takes a whole share of the rollout "
                                                  f"batch: make it a multiple of gradient_accumulation_steps="
                                                  f"{accumulation}")
    return {"prompts_per_step": completions // n, "steps_per_generation": spg // accumulation,
            "micro_batch_size": args.per_device_train_batch_size}


def _length(args: Any, per_batch: int, batches_per_epoch: int, prompts: int) -> tuple[int, int]:
    """(rollout batches, TRL optimizer steps) of the run: max_steps, else num_train_epochs over the rows."""
    if args.max_steps > 0:
        if args.max_steps % per_batch:
            raise refuse("max_steps", args.max_steps, f"a rollout batch makes num_iterations x steps_per_generation = "
                                                      f"{per_batch} optimizer steps: give a multiple of {per_batch}")
        return args.max_steps // per_batch, args.max_steps
    if batches_per_epoch < 1:
        raise ConfigError(f"GRPOConfig: the training data has fewer rows than the {prompts} prompts of one rollout "
                          "batch (generation_batch_size / num_generations)")
    batches = max(1, math.ceil(args.num_train_epochs * batches_per_epoch))
    return batches, batches * per_batch


def _objective(args: Any) -> dict[str, Any]:
    if args.loss_type not in LOSS_TYPES:
        raise refuse("loss_type", args.loss_type, f"its loss types are {', '.join(LOSS_TYPES)}")
    if args.max_grad_norm is None or not args.max_grad_norm > 0:
        raise refuse("max_grad_norm", args.max_grad_norm, "it always clips the gradient norm")
    values: dict[str, Any] = {"loss_type": args.loss_type, "max_grad_norm": args.max_grad_norm,
                              "reward_weights": list(args.reward_weights) if args.reward_weights is not None else None}
    if args.chat_template_kwargs:
        values["chat_template_kwargs"] = json.dumps(args.chat_template_kwargs)
    if args.vllm_importance_sampling_cap is not None:  # TRL's deprecated name, copied to clip_max by TRL too
        values["vllm_importance_sampling_clip_max"] = args.vllm_importance_sampling_cap
    return values


def _precision(args: Any) -> dict[str, Any]:
    """dtype from model_init_kwargs' dtype, else bf16/fp16; attn_implementation; the device."""
    init = dict(args.model_init_kwargs or {})
    extra = sorted(set(init) - set(MODEL_INIT_KEYS))
    if extra:
        raise refuse("model_init_kwargs", init, f"only {', '.join(MODEL_INIT_KEYS)} are honoured, not "
                                                f"{', '.join(extra)}")
    dtype = init.get("dtype", init.get("torch_dtype"))
    dtype = str(dtype).removeprefix("torch.") if dtype not in (None, "auto") else (
        "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32")
    values = {"dtype": dtype, "device": "cpu" if args.use_cpu else "auto"}
    if "attn_implementation" in init:
        values["attn_implementation"] = init["attn_implementation"]
    return values


def _optimizer(args: Any, optimizer_steps: int) -> dict[str, Any]:
    """optim, lr_scheduler_type and warmup_steps (a warmup below 1 is that share of the optimizer steps)."""
    optim, schedule = _value(args.optim), _value(args.lr_scheduler_type)
    if optim not in OPTIMIZERS:
        raise refuse("optim", optim, f"it has {', '.join(OPTIMIZERS)}")
    if schedule not in SCHEDULERS:
        raise refuse("lr_scheduler_type", schedule, f"it has {', '.join(SCHEDULERS)}")
    warmup = args.warmup_steps
    warmup = math.ceil(warmup * optimizer_steps) if 0 < warmup < 1 else int(warmup)
    if schedule == "constant":  # transformers' "constant" has no warm-up, whatever warmup_steps says
        warmup = 0
    return {"optim": OPTIMIZERS[optim], "lr_scheduler_type": SCHEDULERS[schedule], "warmup_steps": warmup}


def _rollout(args: Any) -> dict[str, Any]:
    """use_vllm / vllm_mode: hf, in-process vllm, or a `sparselayer serve` URL."""
    if not args.use_vllm:
        return {"rollout": "hf"}
    if args.vllm_mode == "colocate":
        return {"rollout": "vllm"}
    if args.vllm_mode == "server":
        url = args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}"
        return {"rollout_url": url}
    raise refuse("vllm_mode", args.vllm_mode, "it has colocate and server")


def _steps(value: float, total: int) -> float:
    """A step count; below 1, that share of `total` (transformers' convention), rounded up."""
    return math.ceil(value * total) if 0 < value < 1 else value


def _logging_steps(args: Any, trl_steps: int) -> int:
    strategy = _value(args.logging_strategy)
    if strategy == "epoch":
        raise refuse("logging_strategy", strategy, "it logs by steps: use steps")
    return 0 if strategy == "no" else int(_steps(args.logging_steps, trl_steps))


def _bookkeeping(args: Any, per_batch: int, batches_per_epoch: int, batches: int, logging_steps: int,
                 has_eval: bool) -> dict[str, Any]:
    """Saving, evaluation, reporting, completions and the progress bar, in rollout batches."""
    def batches_of(steps: float) -> int:
        return max(1, math.ceil(_steps(steps, batches * per_batch) / per_batch))

    save, evaluation = _value(args.save_strategy), _value(args.eval_strategy)
    if save not in ("steps", "epoch", "no"):
        raise refuse("save_strategy", save, "it saves by steps or epochs")
    values: dict[str, Any] = {
        "output_dir": args.output_dir,
        "save_steps": {"steps": batches_of(args.save_steps), "epoch": max(1, batches_per_epoch), "no": batches}[save],
        "save_total_limit": args.save_total_limit or max(1, batches),
        "report_to": _reporters(args.report_to),
        "log_completions": batches_of(logging_steps or args.logging_steps) if args.log_completions else 0,
        "progress": not args.disable_tqdm,
        "eval_at_end": evaluation != "no",
        "eval_steps": 0,
    }
    if (evaluation != "no" or args.eval_on_start) and not has_eval:
        raise ConfigError(f"GRPOConfig.eval_strategy={evaluation!r} (or eval_on_start) needs an eval_dataset, as in "
                          "TRL")
    if evaluation == "steps":
        values["eval_steps"] = batches_of(args.eval_steps or args.logging_steps)
    elif evaluation == "epoch":
        values["eval_steps"] = max(1, batches_per_epoch)
    return values


def _reporters(report_to: Any) -> list[str] | None:
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [n for n in names if n != "none"]
    for name in names:
        if name not in REPORTERS:
            raise refuse("report_to", report_to, f"it reports to {', '.join(r for r in REPORTERS if r != 'none')}")
    return names or None

