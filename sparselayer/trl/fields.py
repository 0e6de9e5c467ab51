"""Every field of TRL 1.16's GRPOConfig and what sparselayer does with it: the one table of the TRL front door.

A field `maps` to a sparselayer setting (`sparselayer.trl.mapping` converts it), is `refused` when set to
anything but TRL's default (one ConfigError line naming it), or is `ignored` because it has no effect on the
math (logging, hub, data-loader and launcher plumbing). docs/trl.md holds this table, rendered by
`render_table` (`python -m sparselayer.trl` rewrites it; tests/test_trl_front_door.py checks it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MAPS, REFUSED, IGNORED = "maps", "refused", "ignored"
DOC = Path(__file__).resolve().parents[2] / "docs" / "trl.md"
START, END = "<!-- grpo-config-table:start -->", "<!-- grpo-config-table:end -->"


@dataclass(frozen=True)
class Rule:
    """What sparselayer does with one GRPOConfig field: `kind` (maps, refused, ignored) and the table's note."""

    kind: str
    note: str


def maps(note: str) -> Rule:
    return Rule(MAPS, note)


def refused(note: str) -> Rule:
    return Rule(REFUSED, note)


def ignored(note: str) -> Rule:
    return Rule(IGNORED, note)


_LOGGING = ignored("logging only")
_EVAL_PLUMBING = ignored("evaluation plumbing; sparselayer's evaluation is greedy held-out accuracy")
_HUB = ignored("only with push_to_hub, which is refused")
_LOADER = ignored("data-loader plumbing: the trainer holds the rows itself")
_DDP = ignored("DDP wrapping: under torchrun sparselayer all-reduces the trained layers' gradients itself")
_SHARDED = refused("data-parallel only: every rank holds the whole frozen model")
_ADAPTIVE = ignored("only with use_adaptive_entropy, which is refused")
_GENERATE = refused("sparselayer samples with temperature and top_p only")

FIELDS: dict[str, Rule] = {
    # -- transformers.TrainingArguments --------------------------------------------------------------------
    "output_dir": maps("output_dir (unset: runs/layers-<L>-<time>)"),
    "per_device_train_batch_size": maps("micro_batch_size; with processes and steps_per_generation the rollout "
                                        "batch (batch geometry)"),
    "num_train_epochs": maps("max_steps when max_steps <= 0: epochs x (training rows // prompts_per_step) rollout "
                             "batches"),
    "max_steps": maps("max_steps: TRL's optimizer steps / (num_iterations x steps_per_generation) rollout batches "
                      "(must divide)"),
    "learning_rate": maps("learning_rate"),
    "lr_scheduler_type": maps("lr_scheduler_type: constant (no warm-up, as transformers), constant_with_warmup "
                              "(constant), linear, cosine; others refused"),
    "lr_scheduler_kwargs": refused("the schedules take no arguments"),
    "warmup_steps": maps("warmup_steps (below 1: that share of the optimizer steps); the ramp reaches the full rate "
                         "one step earlier than transformers' (the first update is not at rate 0)"),
    "optim": maps("optim: adamw_torch, adamw_torch_fused -> adamw; adamw_8bit, adamw_bnb_8bit, paged_adamw_8bit -> "
                  "adamw8bit (paging not applied); others refused"),
    "optim_args": refused("AdamW's own defaults only"),
    "weight_decay": maps("weight_decay"),
    "adam_beta1": refused("AdamW's defaults (0.9, 0.999, 1e-8), which are TRL's"),
    "adam_beta2": refused("AdamW's defaults (0.9, 0.999, 1e-8), which are TRL's"),
    "adam_epsilon": refused("AdamW's defaults (0.9, 0.999, 1e-8), which are TRL's"),
    "optim_target_modules": refused("AdamW over the trained layers only"),
    "gradient_accumulation_steps": maps("steps_per_generation = TRL's steps_per_generation / "
                                        "gradient_accumulation_steps (must divide)"),
    "average_tokens_across_devices": refused("the loss is always normalised over the whole batch across ranks"),
    "max_grad_norm": maps("max_grad_norm (0 or unset: refused, sparselayer always clips)"),
    "label_smoothing_factor": ignored("GRPO has no labels (TRL does not use it either)"),
    "bf16": maps("dtype bfloat16 (the model runs in bf16, fp32 master weights of the trained layers; TRL: autocast)"),
    "fp16": maps("dtype float16 (as bf16); neither bf16 nor fp16: float32"),
    "bf16_full_eval": ignored("evaluation runs in the training dtype"),
    "fp16_full_eval": ignored("evaluation runs in the training dtype"),
    "tf32": maps("torch.backends' allow_tf32 switches of this process, as transformers sets them"),
    "gradient_checkpointing": maps("gradient_checkpointing (TRL's default is on: recompute, same gradients)"),
    "gradient_checkpointing_kwargs": ignored("non-reentrant checkpointing always; same gradients"),
    "torch_compile": refused("no torch.compile"),
    "torch_compile_backend": refused("no torch.compile"),
    "torch_compile_mode": refused("no torch.compile"),
    "use_liger_kernel": ignored("sparselayer's own fused LM-head loss (fused_loss) does this job"),
    "liger_kernel_config": ignored("sparselayer's own fused LM-head loss (fused_loss) does this job"),
    "use_cache": ignored("generation cache: no effect on the math"),
    "neftune_noise_alpha": refused("no embedding noise"),
    "torch_empty_cache_steps": ignored("memory housekeeping"),
    "auto_find_batch_size": refused("GRPO groups must stay whole (TRL refuses it too)"),
    "logging_strategy": maps("callbacks' on_log: steps, no; epoch refused (metrics.jsonl gets every step anyway)"),
    "logging_steps": maps("callbacks' on_log every logging_steps optimizer steps; log_completions' interval"),
    "logging_first_step": maps("callbacks' on_log after the first step too"),
    "log_on_each_node": _LOGGING,
    "logging_nan_inf_filter": _LOGGING,
    "include_num_input_tokens_seen": _LOGGING,
    "log_level": _LOGGING,
    "log_level_replica": _LOGGING,
    "disable_tqdm": maps("progress"),
    "report_to": maps("report_to: none, tensorboard, wandb, trackio; others refused"),
    "run_name": _LOGGING,
    "project": _LOGGING,
    "trackio_space_id": _LOGGING,
    "trackio_bucket_id": _LOGGING,
    "trackio_static_space_id": _LOGGING,
    "eval_strategy": maps("eval_steps and eval_at_end: no (no evaluation), steps, epoch; needs eval_dataset"),
    "eval_steps": maps("eval_steps in rollout batches (unset: logging_steps, as transformers)"),
    "eval_delay": refused("evaluation starts with the run"),
    "per_device_eval_batch_size": _EVAL_PLUMBING,
    "prediction_loss_only": _EVAL_PLUMBING,
    "eval_on_start": maps("eval_at_start"),
    "eval_do_concat_batches": _EVAL_PLUMBING,
    "eval_use_gather_object": _EVAL_PLUMBING,
    "eval_accumulation_steps": _EVAL_PLUMBING,
    "include_for_metrics": _EVAL_PLUMBING,
    "batch_eval_metrics": _EVAL_PLUMBING,
    "save_only_model": ignored("a checkpoint holds the trained layers, optimizer, scheduler and RNG: always small"),
    "save_strategy": maps("save_steps: steps, epoch, no (only the final checkpoint); best refused"),
    "save_steps": maps("save_steps in rollout batches (rounded up; below 1: that share of the run)"),
    "save_on_each_node": ignored("rank 0 writes the run directory"),
    "save_total_limit": maps("save_total_limit (unset: every checkpoint is kept)"),
    "enable_jit_checkpoint": ignored("checkpoint plumbing"),
    "push_to_hub": refused("nothing is uploaded; sparselayer export writes a merged model folder"),
    "hub_token": _HUB,
    "hub_private_repo": _HUB,
    "hub_model_id": _HUB,
    "hub_strategy": _HUB,
    "hub_always_push": _HUB,
    "hub_revision": _HUB,
    "load_best_model_at_end": refused("the run ends with its last step's layer (summary.json names the best eval)"),
    "metric_for_best_model": ignored("only with load_best_model_at_end or save_strategy best, both refused"),
    "greater_is_better": ignored("only with load_best_model_at_end or save_strategy best, both refused"),
    "ignore_data_skip": ignored("a resumed run always continues the seeded prompt order"),
    "restore_callback_states_from_checkpoint": ignored("callbacks keep no state in sparselayer checkpoints"),
    "full_determinism": refused("no deterministic-algorithms mode"),
    "seed": maps("seed (prompt order and rollouts)"),
    "data_seed": refused("the prompt order follows seed"),
    "use_cpu": maps("device cpu"),
    "accelerator_config": ignored("Accelerate plumbing"),
    "parallelism_config": _SHARDED,
    "dataloader_drop_last": _LOADER,
    "dataloader_num_workers": _LOADER,
    "dataloader_pin_memory": _LOADER,
    "dataloader_persistent_workers": _LOADER,
    "dataloader_prefetch_factor": _LOADER,
    "dataloader_multiprocessing_context": _LOADER,
    "dataloader_in_order": _LOADER,
    "remove_unused_columns": ignored("every column reaches reward functions (TRL's default, False)"),
    "label_names": ignored("GRPO has no labels"),
    "train_sampling_strategy": refused("prompts are drawn in a seeded random order"),
    "length_column_name": ignored("only with train_sampling_strategy group_by_length, which is refused"),
    "ddp_find_unused_parameters": _DDP,
    "ddp_bucket_cap_mb": _DDP,
    "ddp_broadcast_buffers": _DDP,
    "ddp_static_graph": _DDP,
    "ddp_backend": _DDP,
    "ddp_timeout": _DDP,
    "fsdp": _SHARDED,
    "fsdp_config": _SHARDED,
    "deepspeed": _SHARDED,
    "debug": ignored("debugging switches of transformers' Trainer"),
    "skip_memory_metrics": ignored("peak memory is always in metrics.jsonl"),
    "do_train": ignored("read by scripts, not by the trainer"),
    "do_eval": ignored("read by scripts, not by the trainer"),
    "do_predict": ignored("read by scripts, not by the trainer"),
    "resume_from_checkpoint": ignored("read by scripts, as in transformers: pass train(resume_from_checkpoint=...)"),
    "local_rank": ignored("set by the launcher"),
    # -- trl.GRPOConfig --------------------------------------------------------------------------------------
    "model_init_kwargs": maps("dtype (dtype or torch_dtype) and attn_implementation; other keys refused"),
    "trust_remote_code": refused("Qwen3, Qwen2/Qwen2.5 and Llama from transformers' own code only"),
    "router_aux_loss_coef": refused("no mixture-of-experts models"),
    "disable_dropout": ignored("the supported architectures' configs have no dropout (attention_dropout 0); a "
                               "model with dropout trains with it"),
    "cast_lm_head_to_fp32": refused("the LM head runs in the model's dtype"),
    "num_generations": maps("num_generations"),
    "num_generations_eval": ignored("evaluation is greedy: one completion per prompt"),
    "max_completion_length": maps("max_completion_length"),
    "ds3_gather_for_generation": ignored("DeepSpeed only"),
    "shuffle_dataset": refused("prompts are drawn in a seeded random order"),
    "pad_to_multiple_of": ignored("padding: no effect on the math"),
    "generation_batch_size": maps("prompts_per_step = generation_batch_size / num_generations"),
    "steps_per_generation": maps("steps_per_generation (optimizer steps per rollout batch) = this / "
                                 "gradient_accumulation_steps"),
    "temperature": maps("temperature"),
    "top_p": maps("top_p"),
    "top_k": _GENERATE,
    "min_p": _GENERATE,
    "generation_kwargs": _GENERATE,
    "chat_template_kwargs": maps("chat_template_kwargs"),
    "repetition_penalty": _GENERATE,
    "cache_implementation": ignored("generation cache: no effect on the math"),
    "use_vllm": maps("rollout: False -> hf (transformers generate), True -> vllm or rollout_url (vllm_mode)"),
    "vllm_mode": maps("colocate -> rollout vllm (in-process); server -> rollout_url, a `sparselayer serve` process, "
                      "not `trl vllm-serve`"),
    "vllm_model_impl": refused("vLLM's own model implementation"),
    "vllm_enable_sleep_mode": maps("sleep_mode"),
    "vllm_structured_outputs_regex": _GENERATE,
    "vllm_server_base_url": maps("rollout_url"),
    "vllm_server_host": maps("rollout_url http://host:port when vllm_server_base_url is unset"),
    "vllm_server_port": maps("rollout_url http://host:port when vllm_server_base_url is unset"),
    "vllm_server_timeout": ignored("connection wait"),
    "vllm_group_port": ignored("trl vllm-serve's NCCL group; sparselayer serve takes weights over HTTP"),
    "vllm_gpu_memory_utilization": maps("gpu_memory_utilization"),
    "vllm_max_model_length": maps("max_model_len"),
    "vllm_tensor_parallel_size": maps("vllm_tensor_parallel_size"),
    "beta": maps("beta"),
    "num_iterations": maps("num_iterations"),
    "epsilon": maps("epsilon"),
    "delta": refused("no two-sided clipping"),
    "epsilon_high": maps("epsilon_high"),
    "sapo_temperature_neg": maps("sapo_temperature_neg"),
    "sapo_temperature_pos": maps("sapo_temperature_pos"),
    "vespo_k_pos": refused("no vespo loss"),
    "vespo_lambda_pos": refused("no vespo loss"),
    "vespo_k_neg": refused("no vespo loss"),
    "vespo_lambda_neg": refused("no vespo loss"),
    "importance_sampling_level": maps("importance_sampling_level"),
    "reward_weights": maps("reward_weights"),
    "multi_objective_aggregation": refused("rewards are summed, then normalised per group (TRL's default)"),
    "scale_rewards": maps("scale_rewards"),
    "loss_type": maps("loss_type: grpo, dapo, dr_grpo, bnpo, cispo, sapo; others refused"),
    "mask_truncated_completions": refused("truncated completions stay in the loss"),
    "sync_ref_model": refused("the reference policy is the initial one"),
    "ref_model_mixup_alpha": ignored("only with sync_ref_model, which is refused"),
    "ref_model_sync_steps": ignored("only with sync_ref_model, which is refused"),
    "top_entropy_quantile": refused("every completion token is in the loss"),
    "entropy_coef": refused("no entropy bonus"),
    "use_adaptive_entropy": refused("no entropy bonus"),
    "entropy_coef_min": _ADAPTIVE,
    "entropy_coef_max": _ADAPTIVE,
    "entropy_coef_delta": _ADAPTIVE,
    "entropy_target": _ADAPTIVE,
    "max_tool_calling_iterations": refused("no tool calling"),
    "vllm_importance_sampling_correction": maps("vllm_importance_sampling_correction (no effect with hf rollouts, as "
                                                "TRL without vLLM)"),
    "vllm_importance_sampling_mode": maps("vllm_importance_sampling_mode"),
    "vllm_importance_sampling_clip_max": maps("vllm_importance_sampling_clip_max"),
    "vllm_importance_sampling_clip_min": maps("vllm_importance_sampling_clip_min"),
    "off_policy_mask_threshold": refused("no off-policy sequence mask"),
    "use_bias_correction_kl": maps("use_bias_correction_kl"),
    "log_completions": maps("log_completions: every logging_steps rollout batches, to completions.jsonl and the "
                            "loggers"),
    "log_multimodal": _LOGGING,
    "num_completions_to_print": _LOGGING,
    "log_unique_prompts": _LOGGING,
    "log_completions_hub_repo": refused("nothing is uploaded"),
    "use_transformers_continuous_batching": ignored("generation engine: no effect on the math"),
    "transformers_continuous_batching_config": ignored("generation engine: no effect on the math"),
    "use_transformers_paged": ignored("generation engine: no effect on the math"),
    "vllm_importance_sampling_cap": maps("vllm_importance_sampling_clip_max (TRL copies it there)"),
}


def render_table() -> str:
    """The markdown table of FIELDS, in TRL's field order, for docs/trl.md."""
    rows = ["| GRPOConfig field | sparselayer |", "| --- | --- |"]
    for name, rule in FIELDS.items():
        note = rule.note.replace("|", "\\|")
        what = note if rule.kind == MAPS else f"{rule.kind} ({note})"
        rows.append(f"| `{name}` | {what} |")
    return "\n".join(rows)


def with_table(text: str) -> str:
    """`text` (docs/trl.md) with the block between its table markers replaced by `render_table()`."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{DOC} lacks the markers {START} ... {END}")
    return pattern.sub(lambda _: f"{START}\n{render_table()}\n{END}", text)

