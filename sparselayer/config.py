"""Training configuration: one dataclass per concern, built from defaults <- YAML <- flags, validated once.

Field names follow TRL's GRPOConfig where it has one (learning_rate, num_generations, beta, epsilon,
epsilon_high, num_iterations, loss_type, scale_rewards, max_completion_length, temperature, ...).
Each dataclass's docstring documents its fields once ("Fields:", read by `field_help`): the
`train`/`sweep` flags, their --help and docs/reference.md (`python -m sparselayer.docs`) are all
built from these dataclasses.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .objective import ADVANTAGES, IS_LEVELS, IS_MODES, LOSS_TYPES, SCALE_REWARDS
from .sizes import parse_size

QUANT_MODES = ("none", "nf4", "int8")  # --quant besides auto (sparselayer.model.quant runs them)
LR_SCHEDULERS = ("constant", "linear", "cosine")  # --lr-scheduler-type (sparselayer.optim.lr_factor runs them)


def check_quant_layers(mode: str, trains_all: bool) -> None:
    """ConfigError for nf4/int8 with --layers all: quantization is for frozen layers, and none would be."""
    if mode in ("nf4", "int8") and trains_all:
        raise ConfigError(f"--quant {mode} quantizes the frozen layers, but --layers all trains every layer: "
                          "use --quant none")


def field_help(kind: type) -> dict[str, str]:
    """Each field's help text, from the "Fields:" block of its dataclass's docstring: every setting is
    documented there once, and `sparselayer train --help` and docs/reference.md are built from it."""
    return _parse_fields(kind.__doc__ or "")


@functools.cache
def _parse_fields(doc: str) -> dict[str, str]:
    """The "Fields:" block: `name: text` lines indented 4 (after cleandoc), continuation lines indented 8.
    The block ends at the first line indented less than 4; any other line in it is a ValueError, so a
    slip in a docstring cannot silently move or drop help text."""
    lines = inspect.cleandoc(doc).splitlines()
    helps: dict[str, str] = {}
    name = None
    for line in lines[lines.index("Fields:") + 1:] if "Fields:" in lines else []:
        if line.strip() and not line.startswith(" " * 4):
            break
        entry = re.fullmatch(r" {4}(\w+): (\S.*)", line)
        if entry and entry[1] not in helps:
            name, helps[entry[1]] = entry[1], entry[2]
        elif name and re.fullmatch(r" {8}\S.*", line):
            helps[name] += " " + line.strip()
        elif line.strip():
            raise ValueError(f"config docstring: a Fields: line is neither `    name: help` nor an 8-space "
                             f"continuation: {line!r}")
    return helps


@dataclass
class ModelConfig:
    r"""Which model, which layers are trained, and how it runs.

    Fields:
        model: local Hugging Face folder of a Qwen3, Qwen2/Qwen2.5 or Llama causal LM (safetensors; nothing is
            downloaded); unset: the embedded tiny model, with its recipe as defaults
        layers: trained decoder layer(s): 16, -1 (from the end), 14-18, 10,16, mid:5 (the five middle layers), top:3
            (the three best of a sweep, with --from) or all (full-parameter baseline, same engine); --layer K is the
            one-layer spelling
        layer_ranking: a sweep.csv whose C(k) ranking resolves top:k in --layers and --boost-layers
        dtype: auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16
        attn_implementation: auto (flash_attention_2 when flash-attn is installed and the model runs on CUDA, else
            sdpa) | sdpa | eager | flash_attention_2
        device: auto (CUDA when available, else CPU) | cpu | cuda
        prefix_cache: run the embeddings and the frozen layers below the lowest trained layer once per rollout
            batch, without autograd, and reuse their output in the reference pass and every optimization pass (off,
            or --layers all: a full forward every pass)
        gradient_checkpointing: recompute the trained layer(s) and the layers above them in the backward instead of
            keeping their activations (less memory, one more forward of those layers; same gradients)
        fused_loss: fused LM-head log-probs that never build a tokens x vocab tensor and return only dL/dhidden
            to the GRPO objective's backward; used whenever the head is frozen (--layers all: the plain head)
        quant: frozen decoder layers through bitsandbytes: nf4 (4-bit NormalFloat, bf16 compute) | int8 (LLM.int8())
            | none; auto: nf4 on CUDA when bitsandbytes is installed, else none. The trained layer(s), embeddings
            and LM head stay dense; refused with --layers all
        prefix_cache_budget: device bytes for the frozen-prefix cache (512MiB, 2GiB, 1.5GB, 1e9); entries beyond it
            wait in CPU memory (pinned on CUDA) until the pass that uses them; unset: all on the device (a no-op on
            CPU)
        kernels: backend of every fused kernel (loss, norms, MLP): triton (CUDA; on CPU only under
            TRITON_INTERPRET=1) | torch (chunked PyTorch) | auto (triton on CUDA, torch elsewhere; the environment
            variable SPARSELAYER_KERNELS=torch|triton overrides auto only)
        fused_layers: fused RMSNorm and SwiGLU kernels (forward + backward) in the trained layer(s) and every layer
            above the lowest one; a frozen MLP keeps only its input for the backward (gate/up recomputed); unset:
            on with CUDA, off on CPU (there they cost time and saved no memory in bench_vs_trl)
        share_prompts: with the prefix cache, the rows of a GRPO group run their prompt once per layer and their
            completions attend to its keys and values (same loss and gradients; sdpa/eager attention; micro-batches
            hold whole groups): on | off | auto (where the work saved per layer and micro-batch reaches 1e8 FLOPs on
            CPU, 1e10 on CUDA)
        prefix_source: where the residual stream entering the lowest trained layer comes from: rollout (captured
            by the rollout engine while it samples: the trainer's frozen-prefix pass is skipped) | trainer (the
            trainer's own frozen-prefix pass) | auto (rollout with an in-process vLLM engine whose numerics match
            the trainer's: same dtype, eager, no quantization on one side only; transformers' generate captures
            only with rollout)
    """

    model: str | None = None
    layers: str = "16"
    layer_ranking: str | None = field(default=None, metadata={"aliases": ("--from",), "metavar": "SWEEP_CSV"})
    dtype: str = "auto"
    attn_implementation: str = "auto"
    device: str = "auto"
    prefix_cache: bool = True
    gradient_checkpointing: bool = False
    fused_loss: bool = True
    quant: str = "auto"
    prefix_cache_budget: str | None = None
    kernels: str = "auto"
    fused_layers: bool | None = None
    share_prompts: str = "auto"
    prefix_source: str = "auto"


@dataclass
class TaskConfig:
    r"""Where prompts and rewards come from.

    Fields:
        task: built-in task name: arithmetic, or chain (multi-turn: a running total, one addition per turn;
            docs/environments.md); unset: arithmetic unless --dataset or --env is given
        env: a multi-turn environment class, module:Class or path/to/file.py:Class (imported: this runs that code),
            with reset(seed) -> observation and step(action) -> (observation, reward, done); its episodes are the
            task (docs/environments.md); replaces --task
        max_turns: multi-turn tasks: turns after which an episode stops unfinished (a failure)
        history_length: multi-turn tasks: earlier (observation, action) pairs shown in each turn's prompt before
            the current observation (0: the observation alone)
        chain_turns: --task chain: additions per episode
        per_turn_reward: --task chain: reward 1/turns for each right sum (off: 1 at the end of an episode whose
            every sum is right)
        dataset: JSONL, Parquet or CSV file, or a folder written by datasets' save_to_disk: rows of prompt (text, or a
            conversation: a list of {role, content} messages) or question, an optional answer (checked with
            math-verify: GSM8K ####, \boxed{}), and any other columns, which reach reward functions; held-out
            rows: --eval-dataset, else a split column (train/test), else a seeded 10% split (<= 500 rows);
            replaces --task
        dataset_split: split of a dataset folder or file to train on (unset: train, else the only split)
        eval_dataset: held-out rows from another file or folder (same formats as --dataset)
        reward: one or more reward functions: a built-in (accuracy: math answer checking; format: the completion
            matches --format-pattern; code_tests: the fraction of the row's tests (test_list, tests, test,
            input_output, inputs/outputs columns) the completion's code passes in a sandbox, docs/rewards.md) or
            module:function / path/to/file.py:function, which runs that code, in
            TRL's convention: fn(prompts=[...], completions=[...], completion_ids=[...], **columns) -> list of
            float or None (None: not applicable); unset: the task's own correctness reward
        reward_weights: weight of each --reward in the summed reward, in the same order (unset: all 1)
        format_pattern: regular expression the whole completion must match for the format reward
        chat_template: auto (the tokenizer's chat template renders conversation prompts; text prompts stay text) |
            none (never) | path to a Jinja template file (renders every prompt, text as one user message)
        system_prompt: system message put before every conversation prompt that has none
        chat_template_kwargs: JSON object of extra chat-template variables, e.g. {"enable_thinking": false}
        drop_long_prompts: drop prompts whose tokens leave no room for --max-completion-length within the model's
            context, with a count on stderr (off: such a prompt is an error)
        num_eval: held-out prompts (multi-turn tasks: episodes) for the base and final evaluation (and every
            --eval-steps)
    """

    task: str | None = None
    dataset: str | None = None
    dataset_split: str | None = None
    eval_dataset: str | None = None
    reward: list[str] | None = None
    reward_weights: list[float] | None = None
    format_pattern: str = r"(?s)\s*<think>.*?</think>\s*\S.*"
    chat_template: str = "auto"
    system_prompt: str | None = None
    chat_template_kwargs: str | None = None
    drop_long_prompts: bool = False
    num_eval: int = 500
    env: str | None = None
    max_turns: int = 10
    history_length: int = 0
    chain_turns: int = 3
    per_turn_reward: bool = False


@dataclass
class RLConfig:
    r"""GRPO settings.

    Fields:
        prompts_per_step: prompts per rollout batch, each sampled --num-generations times
        num_generations: completions per prompt: the GRPO group (at least 2)
        learning_rate: AdamW learning rate of the trained layer(s), reached after --warmup-steps, then scheduled by
            --lr-scheduler-type (embedded recipe: 1e-3)
        beta: KL coefficient (k3 estimator) towards the reference policy; 0 runs no reference pass
        epsilon: clipping range of the surrogate: the ratio is clipped to [1 - epsilon, 1 + epsilon_high]
        epsilon_high: upper clipping range (unset: --epsilon); with --loss-type cispo, which requires it, the cap on
            the importance weight itself (TRL's definition, e.g. 5)
        num_iterations: optimization passes per rollout batch; the first pass's log-probs serve as the old-policy
            log-probs unless --old-logp-pass
        steps_per_generation: optimizer steps per rollout batch (TRL's name): its micro-batches split into this many
            consecutive groups, one step each, normalised over its own share as TRL does; all of it repeated
            --num-iterations times. Above 1 the old-policy log-probs come from one no-grad pass before the first step
        loss_type: grpo (sequence mean, then batch mean) | dapo (token mean over the rollout batch) | dr_grpo (token
            sum / (sequences x max completion length)) | bnpo (token mean per micro-batch, averaged) | cispo (dapo's
            normalization; the surrogate -min(ratio, epsilon_high) x advantage x log-prob with the weight detached,
            so every token keeps its gradient; needs --epsilon-high) | sapo (grpo's normalization; a soft gate instead
            of the clip: -sigmoid(tau (ratio - 1)) x 4 / tau x advantage)
        importance_sampling_level: token (one ratio per token) | sequence (GSPO: one ratio per sequence, exp of the
            mean log-ratio over its tokens), for every loss type
        use_bias_correction_kl: with --beta > 0, the KL term is multiplied by the importance ratio (TRL's default:
            the unbiased reverse-KL gradient)
        sapo_temperature_pos: --loss-type sapo: the gate's temperature tau where the advantage is positive
        sapo_temperature_neg: --loss-type sapo: tau where the advantage is zero or negative
        scale_rewards: divide advantages by the group's reward std (group), the batch's (batch) or not at all (none,
            Dr. GRPO); true/false mean group/none
        max_grad_norm: gradient-norm clipping of the trained parameters
        weight_decay: AdamW weight decay
        micro_batch_size: sequences per forward/backward; gradients accumulate over the rollout batch, micro-batches
            are balanced by token count (whole GRPO groups per micro-batch unless --share-prompts off)
        warmup_steps: linear learning-rate warm-up over this many steps
        lr_scheduler_type: the learning rate after --warmup-steps: constant | linear (down to 0 at the run's last
            optimizer step) | cosine (half a cosine down to 0), as transformers' schedules of those names
        optim: adamw | adamw8bit (bitsandbytes' 8-bit AdamW, CPU too); either keeps fp32 master weights of the
            trained layer(s) when the model is bf16/fp16, and checkpoints carry them
        vllm_importance_sampling_correction: weight each token's surrogate by exp(trainer old-policy log-prob -
            sampler log-prob), detached, for the sampler/trainer mismatch; applies when the engine reports sampling
            log-probs (vllm, remote), a no-op with hf; a NaN sampler log-prob counts as no difference
        vllm_importance_sampling_mode: token_truncate | token_mask (per-token weight) | sequence_truncate |
            sequence_mask (one weight per sequence, exp of the summed difference); *_truncate clamps the weight to
            [clip_min, clip_max], *_mask sets it to 0 outside that range
        vllm_importance_sampling_clip_max: upper bound of the correction's weight (unset: none)
        vllm_importance_sampling_clip_min: lower bound of the correction's weight (unset: none)
        tis_cap: alias kept from earlier versions: --tis-cap X is --vllm-importance-sampling-mode token_truncate with
            --vllm-importance-sampling-clip-max X (TRL's deprecated vllm_importance_sampling_cap); X >= 1
        boost_layers: with --layers all: these layers (10,16, mid:3, or top:3 with --from) train at --boost-lr,
            every other parameter at --learning-rate
        boost_lr: learning rate of --boost-layers (give both or neither)
        full_learning_rate: sparselayer sweep only: the full-parameter baseline's learning rate (unset:
            --learning-rate; embedded recipe: 1e-4)
        reference: reference policy of the KL term (beta > 0): swap (the trained tensors' initial values swapped in
            for one no-grad pass over the cached prefix; no second model) | copy (a frozen copy of the model)
        old_logp_pass: a separate no-grad pass for the old-policy log-probs; off: the first optimization pass's own
            log-probs serve (the policy has not moved yet)
        advantage: grpo (each completion against its group; on a multi-turn task every step of an episode gets its
            episode's advantage) | gigpo (multi-turn tasks: the episode's advantage plus --step-advantage-weight
            times the step's discounted return against the steps of its group that saw the same observation;
            arXiv 2505.10978)
        gamma: gigpo: discount of the step returns
        step_advantage_weight: gigpo: weight omega of the step advantage
    """

    prompts_per_step: int = 16
    num_generations: int = 8
    learning_rate: float = 1e-5
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    num_iterations: int = 1
    steps_per_generation: int = 1
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    use_bias_correction_kl: bool = True
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    scale_rewards: str = "group"
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    micro_batch_size: int = 32
    warmup_steps: int = 0
    lr_scheduler_type: str = "constant"
    optim: str = "adamw"
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_mode: str = "sequence_mask"
    vllm_importance_sampling_clip_max: float | None = 3.0
    vllm_importance_sampling_clip_min: float | None = None
    tis_cap: float | None = None
    boost_layers: str | None = None
    boost_lr: float | None = None
    full_learning_rate: float | None = None
    reference: str = "swap"
    old_logp_pass: bool = False
    advantage: str = "grpo"
    gamma: float = 0.95
    step_advantage_weight: float = 1.0


@dataclass
class RolloutConfig:
    r"""How completions are sampled.

    Fields:
        rollout: vllm (an in-process vLLM engine kept in sync by layer-delta weight pushes) | hf (transformers
            generate on the trained model itself) | auto (vllm when it is installed and can serve the model, else
            hf; one line on stderr says why)
        rollout_url: http://host:port of a `sparselayer serve` process: rollouts and weight pushes go there over
            HTTP instead of an in-process engine (docs/remote.md)
        rollout_api_key: the key of that server (its --api-key), sent with every request; unset: the environment
            variable SPARSELAYER_API_KEY, if set
        gpu_memory_utilization: vLLM on GPU: share of GPU memory for its weights and KV cache (TRL:
            vllm_gpu_memory_utilization); on CPU the KV cache is sized for 32k tokens instead
        max_model_len: vLLM: longest prompt + completion (unset: the model's max_position_embeddings)
        enforce_eager: vLLM: no CUDA graphs (faster start, less memory); --no-enforce-eager captures them on GPU
        sleep_mode: vLLM on GPU: release its memory to the trainer between rollouts (TRL: vllm_enable_sleep_mode);
            ignored on CPU, where vLLM has no sleep mode
        vllm_tensor_parallel_size: GPU only, under torchrun: each rollout engine spans this many GPUs (vLLM's
            external-launcher mode); 1: one engine per rank
        check_sync: after every weight push, the engine's log-probs of a fixed sequence must equal the trainer's
            (float32 engine: within 1e-3, bfloat16: 0.1), else the run stops with an error; needs --quant none
        max_completion_length: longest completion in tokens (unset: the task's suggestion, 8 for arithmetic, 256 for
            datasets)
        temperature: sampling temperature
        top_p: nucleus-sampling probability mass, in (0, 1]
    """

    rollout: str = "auto"
    rollout_url: str | None = None
    rollout_api_key: str | None = None
    gpu_memory_utilization: float = 0.3
    max_model_len: int | None = None
    enforce_eager: bool = True
    sleep_mode: bool = False
    vllm_tensor_parallel_size: int = 1
    check_sync: bool = False
    max_completion_length: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class RunConfig:
    r"""Run directory, length, seeding and bookkeeping.

    Fields:
        output_dir: run directory (unset: runs/layers-<L>-<time> for train, runs/sweep-<model>-<task>-<N>steps
            for sweep); with --resume, the run to continue
        max_steps: GRPO steps (rollout batches) to train
        seed: seed of the prompt order (per epoch) and the rollouts (per step)
        save_steps: write a checkpoint every N steps (and at the end)
        save_total_limit: checkpoints kept; older ones are deleted
        eval_at_start: measure the base model's held-out accuracy before training, for the summary
        eval_at_end: measure the trained model's held-out accuracy after training
        progress: show a progress bar of the steps
        max_consecutive_skips: a step whose loss or gradient norm is not finite is skipped (no optimizer step, no
            push; counted as skipped_steps in metrics.jsonl); this many skips in a row stop the run
        report_to: where metrics also go, one or more (or comma-separated): none | tensorboard | wandb | trackio (the
            same keys as metrics.jsonl; wandb honours WANDB_MODE=offline)
        log_completions: every N steps, a few prompts with their completions and rewards go to completions.jsonl in
            the run directory and to the loggers as a table (0: never)
        eval_steps: held-out accuracy every N steps, in metrics.jsonl (eval_accuracy) and the loggers (0: only at
            the start and the end)
    """

    output_dir: str | None = None
    max_steps: int = 100
    seed: int = 0
    save_steps: int = 10
    save_total_limit: int = 2
    eval_at_start: bool = True
    eval_at_end: bool = True
    progress: bool = True
    max_consecutive_skips: int = 3
    report_to: list[str] | None = None
    log_completions: int = 0
    eval_steps: int = 0


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
    def from_mapping(cls, values: Mapping[str, Any], base: TrainConfig | None = None) -> TrainConfig:
        """Overlay `values` (flat keys like `learning_rate`/`learning-rate`, or section mappings) on `base`."""
        cfg = dataclasses.replace(base) if base else cls()
        cfg = cls(**{name: dataclasses.replace(getattr(cfg, name)) for name in SECTIONS})
        for key, value in _flatten(values).items():
            section = _section_of(key)
            setattr(getattr(cfg, section), key, _coerce(section, key, value))
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
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
        """Sectioned plain-data form, as written to the run directory (a reward callable as module:name)."""
        data = dataclasses.asdict(self)
        if data["task"]["reward"]:
            data["task"]["reward"] = [_spec_of(r) for r in data["task"]["reward"]]
        return data

    def validate(self) -> TrainConfig:
        """Check every setting and combination; raise ConfigError with one line on the first problem."""
        rl, ro, run = self.rl, self.rollout, self.run
        _positive(prompts_per_step=rl.prompts_per_step, num_iterations=rl.num_iterations,
                  steps_per_generation=rl.steps_per_generation,
                  micro_batch_size=rl.micro_batch_size,
                  max_steps=run.max_steps, save_steps=run.save_steps, save_total_limit=run.save_total_limit,
                  max_consecutive_skips=run.max_consecutive_skips,
                  vllm_tensor_parallel_size=ro.vllm_tensor_parallel_size,
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
        if rl.loss_type == "cispo" and rl.epsilon_high is None:
            raise ConfigError("--loss-type cispo caps the importance weight at --epsilon-high (TRL's definition): "
                              "give it, e.g. --epsilon-high 5")
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
        _choice("--prefix-source", self.model.prefix_source, ("auto", "rollout", "trainer"))
        _choice("--optim", rl.optim, ("adamw", "adamw8bit"))
        _choice("--lr-scheduler-type", rl.lr_scheduler_type, LR_SCHEDULERS)
        _choice("--reference", rl.reference, ("swap", "copy"))
        if (rl.boost_layers is None) != (rl.boost_lr is None):
            raise ConfigError("--boost-layers and --boost-lr go together: give both or neither")
        for name in ("boost_lr", "full_learning_rate"):
            value = getattr(rl, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
        if rl.tis_cap is not None and not (math.isfinite(rl.tis_cap) and rl.tis_cap >= 1):
            raise ConfigError(f"--tis-cap must be a finite number >= 1, got {rl.tis_cap}")
        _check_objective(rl)
        if self.task.dataset and self.task.task:
            raise ConfigError("--dataset and --task are exclusive: give one of them")
        _check_task(self.task)
        _check_episodes(self.task, rl)
        for name in ("log_completions", "eval_steps"):
            if getattr(run, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(run, name)}")
        for reporter in run.report_to or ():
            _choice("--report-to", reporter, REPORTERS)
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
    if kind.startswith("list"):
        return _coerce_list(key, kind, value)
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


LIST_COMMA_SPLIT = ("report_to", "reward_weights")  # list settings whose items may also be comma-separated
REPORTERS = ("none", "tensorboard", "wandb", "trackio")


def _coerce_list(key: str, kind: str, value: Any) -> list:
    """A list setting from a YAML list, a repeated flag or (report_to, reward_weights) comma-separated text."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if key in LIST_COMMA_SPLIT:
        items = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    if kind.startswith("list[float]"):
        try:
            numbers = [float(item) for item in items]
        except (TypeError, ValueError):
            raise ConfigError(f"setting {key!r} expects numbers, got {value!r}") from None
        if not all(math.isfinite(n) for n in numbers):
            raise ConfigError(f"setting {key!r} expects finite numbers, got {value!r}")
        return numbers
    if any(isinstance(item, (dict, list)) for item in items):
        raise ConfigError(f"setting {key!r} expects text values, got {value!r}")
    if key == "reward":  # in Python, reward functions may be callables as well as names/specs
        return [item if callable(item) else str(item) for item in items]
    return [str(item) for item in items]


def _check_task(task: TaskConfig) -> None:
    """Rewards, their weights, the format pattern and the chat-template settings."""
    if task.reward_weights is not None:
        n = len(task.reward or []) or 1
        if len(task.reward_weights) != n:
            raise ConfigError(f"--reward-weights has {len(task.reward_weights)} weights for {n} reward "
                              f"function{'s' if n != 1 else ''}: give one weight per --reward")
    try:
        re.compile(task.format_pattern)
    except re.error as exc:
        raise ConfigError(f"--format-pattern is not a valid regular expression: {exc}") from None
    if task.chat_template_kwargs is not None:
        try:
            kwargs = json.loads(task.chat_template_kwargs)
        except json.JSONDecodeError:
            kwargs = None
        if not isinstance(kwargs, dict):
            raise ConfigError("--chat-template-kwargs must be a JSON object, e.g. '{\"enable_thinking\": false}'")


def _check_episodes(task: TaskConfig, rl: RLConfig) -> None:
    """The multi-turn settings: --env against --task/--dataset/--reward, turns, history, GiGPO's settings."""
    if task.env and (task.task or task.dataset):
        raise ConfigError("--env is the task: give it without --task or --dataset")
    if (task.env or task.task == "chain") and task.reward:
        raise ConfigError("a multi-turn task's rewards come from its environment: --reward does not apply")
    _positive(max_turns=task.max_turns, chain_turns=task.chain_turns)
    if task.history_length < 0:
        raise ConfigError(f"--history-length must be >= 0, got {task.history_length}")
    _choice("--advantage", rl.advantage, ADVANTAGES)
    if not (math.isfinite(rl.gamma) and 0 <= rl.gamma <= 1):
        raise ConfigError(f"--gamma must be in [0, 1], got {rl.gamma}")
    if not (math.isfinite(rl.step_advantage_weight) and rl.step_advantage_weight >= 0):
        raise ConfigError(f"--step-advantage-weight must be a finite number >= 0, got {rl.step_advantage_weight}")


def _spec_of(reward: Any) -> str:
    """A reward as text: a callable as module:qualified_name (what --reward would load), else itself."""
    if not callable(reward):
        return str(reward)
    return f"{getattr(reward, '__module__', '?')}:{getattr(reward, '__qualname__', type(reward).__name__)}"


def _check_objective(rl: RLConfig) -> None:
    """The loss options beyond the loss type: ratio level, SAPO temperatures, the sampler correction."""
    _choice("--importance-sampling-level", rl.importance_sampling_level, IS_LEVELS)
    _choice("--vllm-importance-sampling-mode", rl.vllm_importance_sampling_mode, IS_MODES)
    for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
        value = getattr(rl, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    low, high = rl.vllm_importance_sampling_clip_min, rl.vllm_importance_sampling_clip_max
    for name, value in (("min", low), ("max", high)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"--vllm-importance-sampling-clip-{name} must be a finite number >= 0, got {value}")
    if low is not None and high is not None and low >= high:
        raise ConfigError(f"--vllm-importance-sampling-clip-min ({low}) must be below "
                          f"--vllm-importance-sampling-clip-max ({high})")


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
