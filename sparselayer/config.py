"""Training configuration: one dataclass per concern, built from defaults <- YAML <- flags, validated once.

Field names follow TRL's GRPOConfig where it has one (learning_rate, num_generations, beta, epsilon,
epsilon_high, num_iterations, loss_type, scale_rewards, max_completion_length, temperature, ...).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError
from .sizes import parse_size

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")
QUANT_MODES = ("none", "nf4", "int8")  # --quant besides auto (sparselayer.model.quant runs them)


def check_quant_layers(mode: str, trains_all: bool) -> None:
    """ConfigError for nf4/int8 with --layers all: quantization is for frozen layers, and none would be."""
    if mode in ("nf4", "int8") and trains_all:
        raise ConfigError(f"--quant {mode} quantizes the frozen layers, but --layers all trains every layer: "
                          "use --quant none")


@dataclass
class ModelConfig:
    """Which model, which layers are trained, and how it runs."""

    model: str | None = None  # local HF folder; None: the embedded default
    layers: str = "16"  # "16", "-1", "14-18", "10,16", "mid:5", "top:3" (needs layer_ranking) or "all"
    layer_ranking: str | None = None  # sweep.csv whose C(k) ranking resolves "top:k" (CLI: --from)
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16
    attn_implementation: str = "auto"  # auto (flash_attention_2 if installed on CUDA, else sdpa) | sdpa | eager
    device: str = "auto"  # auto | cpu | cuda
    prefix_cache: bool = True  # run the frozen layers below the trained ones once per rollout batch
    gradient_checkpointing: bool = False  # recompute the layers above the cache in the backward (less memory)
    fused_loss: bool = True  # fused LM-head log-prob + GRPO loss (no tokens x vocab tensor) when the head is frozen
    quant: str = "auto"  # auto (nf4 on CUDA with bitsandbytes installed, else none) | none | nf4 | int8: frozen layers
    prefix_cache_budget: str | None = None  # e.g. "2GiB": cache beyond it spills to CPU memory (pinned on CUDA)
    kernels: str = "auto"  # auto (triton on CUDA, chunked torch elsewhere) | triton | torch
    fused_layers: bool = True  # fused RMSNorm/SwiGLU in the trained layer(s) and the frozen layers above them
    share_prompts: str = "auto"  # prefix-cache path: a group's prompt runs once | auto (when it saves enough) | on | off


@dataclass
class TaskConfig:
    """Where prompts and rewards come from."""

    task: str | None = None  # built-in task name; None: arithmetic (unless --dataset)
    dataset: str | None = None  # JSONL/Parquet prompt/answer file; replaces --task
    reward: str | None = None  # "module:function" in TRL's reward-function convention
    num_eval: int = 500  # held-out prompts used by evaluation


@dataclass
class RLConfig:
    """GRPO settings."""

    prompts_per_step: int = 16
    num_generations: int = 8
    learning_rate: float = 1e-5
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: same as epsilon
    num_iterations: int = 1
    loss_type: str = "dapo"
    scale_rewards: str = "group"  # group | batch | none (true/false accepted: group/none)
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    micro_batch_size: int = 32
    warmup_steps: int = 0
    optim: str = "adamw"  # adamw (fp32 master weights for bf16 models) | adamw8bit (bitsandbytes)
    tis_cap: float | None = None  # truncated importance sampling: cap on trainer/sampler probability ratios
    boost_layers: str | None = None  # with --layers all: these layers ("top:3", "10,16") train at --boost-lr
    boost_lr: float | None = None  # learning rate of --boost-layers (every other layer: --learning-rate)
    full_learning_rate: float | None = None  # sweep: the full-parameter baseline's rate (None: --learning-rate)


@dataclass
class RolloutConfig:
    """How completions are sampled."""

    rollout: str = "auto"  # auto (vllm when importable, else hf) | vllm | hf
    rollout_url: str | None = None  # http://host:port of `sparselayer serve`: rollouts and pushes go there
    gpu_memory_utilization: float = 0.3  # vLLM: fraction of GPU memory for its weights and KV cache
    max_model_len: int | None = None  # vLLM: None = longest prompt + max completion length
    enforce_eager: bool = True  # vLLM: no CUDA graphs (faster start, less memory)
    sleep_mode: bool = False  # vLLM on GPU: hand its memory back to the trainer between rollouts
    check_sync: bool = False  # after each push, compare vLLM's log-probs of a fixed sequence with the trainer's
    max_completion_length: int | None = None  # None: the task's suggestion (8 for arithmetic, 256 otherwise)
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class RunConfig:
    """Run directory, length, seeding and bookkeeping."""

    output_dir: str | None = None  # None: runs/<layers>-<timestamp>
    max_steps: int = 100
    seed: int = 0
    save_steps: int = 10  # checkpoint every N steps (and at the end)
    save_total_limit: int = 2
    eval_at_start: bool = True  # measure base accuracy for the final summary
    eval_at_end: bool = True
    progress: bool = True


SECTIONS = {"model": ModelConfig, "task": TaskConfig, "rl": RLConfig, "rollout": RolloutConfig, "run": RunConfig}


@dataclass
class TrainConfig:
    """Everything a training run needs; `TrainConfig.from_mapping` accepts flat or sectioned keys."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: "TrainConfig | None" = None) -> "TrainConfig":
        """Overlay `values` (flat keys like `learning_rate`/`learning-rate`, or section mappings) on `base`."""
        cfg = dataclasses.replace(base) if base else cls()
        cfg = cls(**{name: dataclasses.replace(getattr(cfg, name)) for name in SECTIONS})
        for key, value in _flatten(values).items():
            section = _section_of(key)
            setattr(getattr(cfg, section), key, _coerce(section, key, value))
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, base: "TrainConfig | None" = None) -> "TrainConfig":
        """Read a YAML config file (flat or sectioned keys)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings")
        return cls.from_mapping(data, base)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Sectioned plain-data form, as written to the run directory."""
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        """Check every setting and combination; raise ConfigError with one line on the first problem."""
        rl, ro, run = self.rl, self.rollout, self.run
        _positive(prompts_per_step=rl.prompts_per_step, num_iterations=rl.num_iterations,
                  micro_batch_size=rl.micro_batch_size,
                  max_steps=run.max_steps, save_steps=run.save_steps, save_total_limit=run.save_total_limit,
                  num_eval=self.task.num_eval)
        if ro.max_completion_length is not None and ro.max_completion_length < 1:
            raise ConfigError(f"--max-completion-length must be at least 1, got {ro.max_completion_length}")
        for name in ("learning_rate", "beta", "epsilon", "epsilon_high", "max_grad_norm", "weight_decay"):
            value = getattr(rl, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if not (math.isfinite(ro.temperature) and math.isfinite(ro.top_p)):
            raise ConfigError("--temperature and --top-p must be finite numbers")
        if rl.num_generations < 2:
            raise ConfigError("--num-generations must be at least 2 (GRPO compares completions within a group)")
        if not rl.learning_rate > 0:
            raise ConfigError("--learning-rate must be positive")
        if rl.beta < 0 or rl.epsilon <= 0 or (rl.epsilon_high is not None and rl.epsilon_high <= 0):
            raise ConfigError("--beta must be >= 0 and --epsilon/--epsilon-high > 0")
        if rl.loss_type not in LOSS_TYPES:
            raise ConfigError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {rl.loss_type!r}")
        if rl.scale_rewards not in SCALE_REWARDS:
            raise ConfigError(f"--scale-rewards must be one of {', '.join(SCALE_REWARDS)}, got {rl.scale_rewards!r}")
        if not ro.temperature > 0 or not 0 < ro.top_p <= 1:
            raise ConfigError("--temperature must be > 0 and --top-p in (0, 1]")
        _choice("--rollout", ro.rollout, ("auto", "vllm", "hf"))
        _choice("--quant", self.model.quant, ("auto", *QUANT_MODES))
        check_quant_layers(self.model.quant, str(self.model.layers).strip().lower() == "all")
        if self.model.prefix_cache_budget is not None:
            parse_size(self.model.prefix_cache_budget)
        _choice("--kernels", self.model.kernels, ("auto", "triton", "torch"))
        _choice("--share-prompts", self.model.share_prompts, ("auto", "on", "off"))
        _choice("--optim", rl.optim, ("adamw", "adamw8bit"))
        if (rl.boost_layers is None) != (rl.boost_lr is None):
            raise ConfigError("--boost-layers and --boost-lr go together: give both or neither")
        for name in ("boost_lr", "full_learning_rate"):
            value = getattr(rl, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
        if rl.tis_cap is not None and not (math.isfinite(rl.tis_cap) and rl.tis_cap >= 1):
            raise ConfigError(f"--tis-cap must be a finite number >= 1, got {rl.tis_cap}")
        if self.task.dataset and self.task.task:
            raise ConfigError("--dataset and --task are exclusive: give one of them")
        _choice("--dtype", self.model.dtype, ("auto", "float32", "bfloat16", "float16"))
        _choice("--attn-implementation", self.model.attn_implementation, ("auto", "sdpa", "eager", "flash_attention_2"))
        _choice("--device", self.model.device, ("auto", "cpu", "cuda"))
        return self


def _flatten(values: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key).replace("-", "_")
        if key in SECTIONS and isinstance(value, Mapping):
            for inner, inner_value in value.items():
                inner = str(inner).replace("-", "_")
                if _section_of(inner) != key:
                    raise ConfigError(f"setting {inner!r} does not belong in section {key!r}")
                flat[inner] = inner_value
        else:
            flat[key] = value
    return flat


def _section_of(key: str) -> str:
    for section, kind in SECTIONS.items():
        if key in {f.name for f in dataclasses.fields(kind)}:
            return section
    raise ConfigError(f"unknown setting {key!r}")


def _coerce(section: str, key: str, value: Any) -> Any:
    """Convert YAML/flag values to the field's type, with a clear error."""
    kind = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == key).type
    if value is None:
        if "None" in str(kind):
            return None
        raise ConfigError(f"setting {key!r} cannot be empty")
    if key == "scale_rewards" and isinstance(value, (bool, str)):
        return {"true": "group", "false": "none", "on": "group", "off": "none"}.get(str(value).lower(), str(value))
    if key == "share_prompts" and isinstance(value, bool):  # YAML reads on/off as booleans
        return "on" if value else "off"
    if key == "layers":
        return str(value)
    try:
        if kind.startswith("bool"):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {key!r} expects {kind.split(' ')[0]}, got {value!r}") from None


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
