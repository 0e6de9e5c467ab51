"""The GRPO trainer for one (or a few) trained layers; `Trainer.step` is the whole step, top-down.

sample -> score -> advantages -> frozen prefix once per batch -> reference log-probs -> optimization
passes (trained layer + frozen suffix -> head log-probs -> the one objective -> backward) ->
optimizer step -> push the changed layer to the rollout engine. Every stage lives one level down:
`model.forward` (cached prefix or full forward), `model.head` (fused or plain log-probs),
`objective` (advantages, loss types, token weights), `rollout` (engines), `sync` (the push check).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .batch import Rollouts, StepBatch, collate
from .config import TrainConfig
from .contributions import resolve_layers
from .distributed import all_reduce_gradients, all_reduce_sum, check_tensor_parallel, gather_objects, setup
from .errors import ConfigError, RunError
from .kernels.patch import resolve_kernels, use_fused_kernels
from .memory import peak_bytes, reset_peak
from .metrics import PhaseTimer, reward_function_metrics, step_metrics
from .model.forward import CachedPrefixForward, FullForward, PreparedBatch
from .model.head import LogProbHead
from .model.layout import decoder_layers, freeze_except, layers_label, load_model
from .model.quant import quantize_frozen, resolve_quant
from .model.reference import frozen_copy, initial_values, swapped_in
from .objective import (
    BatchTotals,
    ObjectiveOptions,
    gigpo_advantages,
    group_advantages,
    objective_loss,
    sampling_correction,
    share_weights,
    step_shares,
    token_weights,
)
from .optim import build_optimizer, build_scheduler, grad_tensors
from .rollout import build_engine
from .rollout.base import RolloutEngine
from .rollout.capture import resolve_prefix_source
from .rollout.episodes import EpisodeRollouts, collect_episodes
from .sizes import parse_size
from .sync.check import TOLERANCE, check_sync, sync_sequence
from .tasks import Example, RewardBatch, Task, reward_set_of, task_from_config
from .tasks.chat import PromptRenderer, fit_to_context
from .tasks.envs import env_task_of
from .tasks.sampler import PromptSampler


class Trainer:
    """GRPO over the trained layers only; everything else is frozen (no grads, no optimizer state)."""

    def __init__(self, config: TrainConfig, task: Task | None = None, engine: RolloutEngine | None = None):
        self.config = config.validate()
        m, rl = config.model, config.rl
        self.world = setup(m.device)  # under torchrun: this rank's place in the job (else a world of one)
        if self.world.size > 1 and rl.prompts_per_step < self.world.size:
            raise ConfigError(f"--prompts-per-step {rl.prompts_per_step} is below the {self.world.size} ranks: "
                              "each rank needs at least one prompt (a whole GRPO group)")
        self.task = task_from_config(config.task, task)
        self.model, self.tokenizer = load_model(m.model, m.dtype, m.device, m.attn_implementation)
        self.device = next(self.model.parameters()).device
        self.max_completion_length = config.rollout.max_completion_length or self.task.suggested_max_completion_length
        # every prompt rendered to token ids once (chat template, system prompt) and checked against the context
        self.renderer = PromptRenderer.from_config(self.tokenizer, config.task)
        context = config.rollout.max_model_len or getattr(self.model.config, "max_position_embeddings", None)
        self.task = fit_to_context(self.task, self.renderer, context, self.max_completion_length,
                                   config.task.drop_long_prompts)
        self.layers = resolve_layers(m.layers, len(decoder_layers(self.model)), m.layer_ranking)
        self.trained = freeze_except(self.model, self.layers)
        self.quant = resolve_quant(m.quant, self.device, self.layers)  # frozen decoder layers via bitsandbytes
        quantize_frozen(self.model, self.layers, self.quant)
        self.kernels = resolve_kernels(m.kernels, self.device)  # --kernels: "torch" or "triton" from here on
        fused = m.fused_layers if m.fused_layers is not None else self.device.type == "cuda"  # unset: CUDA only
        if fused:  # fused RMSNorm/SwiGLU where autograd runs (trained layers and above)
            use_fused_kernels(self.model, self.layers, self.kernels)
        self.forward = self._build_forward()
        self.head = LogProbHead(self.model.lm_head, config.rollout.temperature, m.fused_loss, self.kernels)
        self.reference = None if rl.beta == 0 else (
            frozen_copy(self.model) if rl.reference == "copy" else initial_values(self.trained))
        self.tp = config.rollout.vllm_tensor_parallel_size  # ranks per rollout engine (GPU, torchrun)
        check_tensor_parallel(self.tp, self.device.type, config.rollout.rollout, self.world)
        self.engine = engine or build_engine(config.rollout, m.model, self.model, self.tokenizer, config.run.seed)
        if self.engine.tensor_parallel_size != self.tp:
            raise ConfigError(f"--vllm-tensor-parallel-size {self.tp}: the rollout engine passed in spans "
                              f"{self.engine.tensor_parallel_size} GPU(s)")
        # --prefix-source: "rollout" has the engine capture the states entering the lowest trained layer
        self.prefix_source = resolve_prefix_source(m.prefix_source, self.engine, getattr(self.forward, "start", None),
                                                   self.model.dtype, self.device, self.quant,
                                                   getattr(self.forward, "budget_bytes", None))
        self.sync_ids = sync_sequence(self.tokenizer, self.task, self.renderer) if config.rollout.check_sync else None
        if self.sync_ids is not None and self.quant != "none":
            raise ConfigError("--check-sync compares with the trainer's unquantized forward: use --quant none")
        self.optimizer = build_optimizer(self.param_groups(), rl.optim, rl.learning_rate, rl.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, rl.lr_scheduler_type, rl.warmup_steps,  # per optimizer step
                                         config.run.max_steps * rl.num_iterations * rl.steps_per_generation)
        self.sampler = PromptSampler(len(self.task.train), config.run.seed)
        self.step_count, self.push_bytes, self.allreduce_bytes = 0, 0, 0
        self.skipped_steps, self.consecutive_skips = 0, 0  # steps skipped for a non-finite loss or gradient
        self.last_batch: StepBatch | None = None  # the latest step's batch (its inputs freed): --log-completions

    def step(self) -> dict[str, Any]:
        """One GRPO step on a fresh rollout batch; returns its metrics line."""
        rl = self.config.rl
        reset_peak(self.device)
        self.allreduce_bytes = 0
        timer = PhaseTimer()
        examples = self.next_examples()
        rollouts = self.generate(examples)  # sample
        examples, rollouts = self.training_share(examples, rollouts)  # a multi-GPU engine's ranks split its batch
        timer.mark("rollout_s")
        sb = self.last_batch = self.score(rollouts, examples)  # rewards, advantages, micro-batches, token weights
        timer.mark("reward_s")
        self.attach_prefix(sb)  # the frozen prefix, once for the whole batch
        shared = sb.inputs.shared
        if rl.beta > 0:
            sb.ref_logp = self.reference_logprobs(sb)
        if self._old_logp_pass():  # else the first pass's own log-probs are the old policy's
            sb.old_logp = self.policy_logprobs(sb)
        timer.mark("logprob_s")
        passes = self.optimize_passes(sb)  # stops at a pass whose loss or gradient norm is not finite
        sb.inputs = None  # the batch is done: free its cached activations before the push
        timer.mark("train_s")
        moved = not passes[0]["skipped"]
        self.push_bytes = self.engine.update_weights(self.trained_state().items()) if moved else 0
        if moved:
            self.check_sync()
        timer.mark("push_s")
        self.step_count += 1
        self.count_skip(passes[-1]["skipped"])  # RunError after --max-consecutive-skips in a row
        metrics = step_metrics(self.step_count, sb, passes, timer.phases, shared_micro_batches=shared,
                               learning_rate=self.scheduler.get_last_lr()[0], push_bytes=self.push_bytes,
                               skipped_steps=self.skipped_steps, peak_mem_bytes=peak_bytes(self.device))
        return self._global_metrics(metrics, sb) if self.world.size > 1 else metrics

    # -- the stages, in step order -------------------------------------------------------------------

    def next_examples(self) -> list[Example]:
        """This step's prompts, in the seeded order (a resumed run continues it); under torchrun this rank's
        contiguous share of them, so each rank samples and scores whole GRPO groups."""
        n = self.config.rl.prompts_per_step
        order = self.sampler.take(self.step_count * n, n)
        return [self.task.train[order[i]] for i in self.world.engine_group(self.tp).shard(n)]

    def training_share(self, examples: list[Example], rollouts: Rollouts) -> tuple[list[Example], Rollouts]:
        """With --vllm-tensor-parallel-size the ranks of one engine sampled the same prompts together; each
        keeps its contiguous part of them (whole groups) to train on. One rank per engine: all of them."""
        if self.tp == 1:
            return examples, rollouts
        n = self.config.rl.num_generations
        part = self.world.within_engine_group(self.tp).shard(len(examples))
        a, b = part.start, part.stop
        states = rollouts.states
        if states is not None:
            states = dataclasses.replace(states, prompts=states.prompts[a:b],
                                         completions=states.completions[a * n:b * n])
        logprobs = rollouts.sampling_logprobs
        return examples[a:b], dataclasses.replace(
            rollouts, prompt_ids=rollouts.prompt_ids[a * n:b * n], completion_ids=rollouts.completion_ids[a * n:b * n],
            sampling_logprobs=None if logprobs is None else logprobs[a * n:b * n], states=states)

    def generate(self, examples: list[Example]) -> Rollouts:
        """Completions for this step's prompts, seeded by (seed, step) so a resumed run samples the same; for a
        multi-turn task, the episodes of this step's seeds, one row per step (`collect_episodes`)."""
        rl, ro = self.config.rl, self.config.rollout
        if env_task_of(self.task) is not None:
            return self.collect_episodes(examples)
        prompts = self.renderer.token_ids(examples)  # rendered once (chat template): every engine samples these ids
        return self.engine.generate(prompts, rl.num_generations, self.max_completion_length,
                                    ro.temperature, ro.top_p, seed=self._rollout_seed())

    def score(self, rollouts: Rollouts, examples: list[Example]) -> StepBatch:
        """Rewards (each reward function's, in TRL's convention, and their weighted sum) and correctness of the
        completions, their group advantages, micro-batches and token weights."""
        rl, n = self.config.rl, self.config.rl.num_generations
        if isinstance(rollouts, EpisodeRollouts):
            return self.score_episodes(rollouts)
        if rl.advantage == "gigpo":
            raise ConfigError("--advantage gigpo needs a multi-turn task (--task chain or --env module:Class)")
        texts = self.tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        per_row = [e for e in examples for _ in range(n)]
        scores = reward_set_of(self.task).score(RewardBatch(per_row, texts, rollouts.completion_ids))
        rewards = torch.tensor(scores.total, dtype=torch.float32)
        correct = torch.tensor([self.task.is_correct(t, e) for t, e in zip(texts, per_row)], dtype=torch.float32)
        batch = collate(rollouts, self.tokenizer.pad_token_id, self.device)
        micro = self.forward.pack(batch, n, rl.micro_batch_size)
        weights = token_weights(batch.completion_mask, rl.loss_type, self.max_completion_length, micro,
                                self._batch_totals(batch.completion_mask, micro))
        return StepBatch(batch, rewards, correct, self._advantages(rewards).to(self.device), micro, weights,
                         function_rewards=scores.per_function, prompts=[e.prompt for e in per_row], completions=texts)

    def collect_episodes(self, examples: list[Example]) -> EpisodeRollouts:
        """Multi-turn: --num-generations episodes of each example's seed, played turn by turn through the engine."""
        if self.world.size > 1:
            raise ConfigError("multi-turn tasks train in one process for now: run without torchrun")
        rl, ro = self.config.rl, self.config.rollout
        seeds = [e.columns["seed"] for e in examples]
        return collect_episodes(self.engine, env_task_of(self.task), seeds, rl.num_generations, self.renderer,
                                self.max_completion_length, ro.temperature, ro.top_p,
                                seed=self._rollout_seed() * 1_009).rollouts()

    def score_episodes(self, rollouts: EpisodeRollouts) -> StepBatch:
        """One row per step: the step's reward, its episode's success as `correct`, GiGPO's advantage (--advantage
        grpo: the episode's GRPO advantage) per step; each episode's return and success once, on its last step's
        row (rewards/episode_return, rewards/episode_success). Steps of a group share no prompt, so micro-batches
        are balanced by tokens alone (rows that do share one still run it once, found by content)."""
        rl, episodes = self.config.rl, rollouts.episodes
        steps = episodes.steps
        rewards = torch.tensor([s.reward for s in steps], dtype=torch.float32)
        correct = torch.tensor([float(episodes.success[s.episode]) for s in steps])
        advantages = gigpo_advantages(rewards, [s.episode for s in steps], [s.observation for s in steps],
                                      rl.num_generations, rl.gamma,
                                      rl.step_advantage_weight if rl.advantage == "gigpo" else 0.0, rl.scale_rewards)
        batch = collate(rollouts, self.tokenizer.pad_token_id, self.device)
        micro = self.forward.pack(batch, 1, rl.micro_batch_size)
        weights = token_weights(batch.completion_mask, rl.loss_type, self.max_completion_length, micro)
        last = {s.episode: j for j, s in enumerate(steps)}
        outcome = {"episode_return": [episodes.returns[s.episode] if last[s.episode] == j else None
                                      for j, s in enumerate(steps)],
                   "episode_success": [float(episodes.success[s.episode]) if last[s.episode] == j else None
                                       for j, s in enumerate(steps)]}
        return StepBatch(batch, rewards, correct, advantages.to(self.device), micro, weights, function_rewards=outcome,
                         prompts=[s.prompt for s in steps], completions=[s.action for s in steps])

    def attach_prefix(self, sb: StepBatch) -> PreparedBatch:
        """Prepare every micro-batch once for all passes (the cached frozen prefix, or plain sub-batches); with
        --prefix-source rollout, from the states the engine captured while sampling (no frozen-prefix pass)."""
        states, sb.batch.states = sb.batch.states, None  # consumed here: the prepared entries hold what is needed
        use = states if self.prefix_source == "rollout" else None
        sb.inputs = self.forward.prepare(sb.batch, sb.micro_batches, use)
        return sb.inputs

    @torch.no_grad()
    def reference_logprobs(self, sb: StepBatch) -> torch.Tensor:
        """Log-probs (B x C) under the reference policy (--reference swap: the trained tensors' initial
        values swapped in; copy: a separate frozen model, run in full)."""
        if isinstance(self.reference, torch.nn.Module):  # the same head computation as the policy's
            forward = FullForward(self.reference)
            head = LogProbHead(self.reference.lm_head, self.head.temperature, self.head.fused, self.kernels)
            return self.batch_logprobs(sb, forward, forward.prepare(sb.batch, sb.micro_batches), head)
        with swapped_in(self.trained, self.reference):
            return self.policy_logprobs(sb)

    @torch.no_grad()
    def policy_logprobs(self, sb: StepBatch) -> torch.Tensor:
        """Log-probs (B x C) under the current policy, without gradient."""
        return self.batch_logprobs(sb, *self._prepared(sb), self.head)

    def optimize_passes(self, sb: StepBatch) -> list[dict[str, Any]]:
        """--num-iterations passes over the rollout batch, each --steps-per-generation optimizer steps on
        consecutive shares of its micro-batches; one entry per optimizer step. A step that skips (non-finite)
        ends the step's passes."""
        shares, weights = self._step_shares(sb)
        passes = []
        for iteration in range(self.config.rl.num_iterations):
            for share in shares:
                passes.append(self.optimize(sb, iteration, share, weights))
                if passes[-1]["skipped"]:
                    return passes
        return passes

    def optimize(self, sb: StepBatch, iteration: int = 0, share: list[int] | None = None,
                 weights: torch.Tensor | None = None) -> dict[str, Any]:
        """One optimizer step: accumulate gradients over the micro-batches of `share` (unset: all of them; their
        token `weights`, unset: sb.weights), clip, step.

        A pass whose loss or gradient norm is not finite is skipped: its gradients are dropped and neither
        the optimizer nor the learning-rate schedule steps, so one bad batch cannot turn the layer into NaN.
        """
        self.optimizer.zero_grad(set_to_none=True)
        stats: dict[str, Any] = self.accumulate_gradients(sb, iteration, share, weights)
        # under torchrun: the trained layers' gradients (fp32 masters for a bf16 model), one flat bucket
        self.allreduce_bytes += all_reduce_gradients(grad_tensors(self.optimizer))
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(grad_tensors(self.optimizer),
                                                                   self.config.rl.max_grad_norm))
        stats["skipped"] = not (math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"]))
        if stats["skipped"]:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.scheduler.step()
        return stats

    def count_skip(self, skipped: bool) -> None:
        """Count a skipped step; --max-consecutive-skips of them in a row stop the run (RunError)."""
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        self.skipped_steps += int(skipped)
        limit = self.config.run.max_consecutive_skips
        if self.consecutive_skips >= limit:
            raise RunError(f"stopped at step {self.step_count}: {limit} steps in a row had a non-finite loss or "
                           "gradient norm and were skipped (try a lower --learning-rate or --max-grad-norm); "
                           "the last checkpoint is intact")

    def accumulate_gradients(self, sb: StepBatch, iteration: int = 0, share: list[int] | None = None,
                             weights: torch.Tensor | None = None) -> dict[str, float]:
        """Add d(loss)/d(trained params) to .grad, one micro-batch of `share` (unset: all) at a time, with token
        `weights` (unset: sb.weights); for a bf16/fp16 model, to the fp32 masters' .grad (`optim.grad_tensors`).

        Pass 0 without the old-policy pass is on-policy: the policy has not moved, so its own log-probs,
        detached, are the old policy's; they are recorded in sb.old_logp for the later passes, which
        read them from there.
        """
        forward, inputs = self._prepared(sb)
        share = range(len(sb.micro_batches)) if share is None else share
        weights = sb.weights if weights is None else weights
        options = self._objective_options()
        first = iteration == 0 and not self._old_logp_pass()
        if not first and sb.old_logp is None:
            raise ValueError("a pass other than the on-policy first one needs sb.old_logp")
        if first:
            sb.old_logp = torch.zeros(sb.batch.completion_mask.shape, device=self.device)
        totals = {"loss": 0.0, "kl": 0.0, "clip": 0.0}
        self.model.train()
        for j in share:
            rows = sb.micro_batches[j]
            hidden, sub = forward.hidden(inputs, j)
            logp = self.head(hidden, sub)
            C = logp.shape[1]
            if first:
                sb.old_logp[rows, :C] = logp.detach()
            old = sb.old_logp[rows, :C]
            ref = None if sb.ref_logp is None else sb.ref_logp[rows, :C]
            tl = objective_loss(logp, old, sb.advantages[rows], options, ref, self._sampling_weights(old, sub),
                                sub.completion_mask)
            loss = (tl.loss * weights[rows, :C]).sum()
            loss.backward()
            mask = sub.completion_mask.float()
            totals["loss"] += loss.item()
            totals["kl"] += float((tl.kl.detach() * mask).sum())
            totals["clip"] += float((tl.clipped.float() * mask).sum())
        self.model.eval()
        ntok = float(sum(sb.batch.completion_mask[sb.micro_batches[j]].sum() for j in share))
        if self.world.size > 1:  # the whole batch's loss and token counts (each rank holds its share)
            totals["loss"], totals["kl"], totals["clip"], ntok = all_reduce_sum(
                [totals["loss"], totals["kl"], totals["clip"], ntok])
        ntok = max(ntok, 1.0)
        return {"loss": totals["loss"], "kl": totals["kl"] / ntok, "clip_ratio": totals["clip"] / ntok}

    def check_sync(self) -> float | None:
        """--check-sync: after a push the engine's log-probs of a fixed sequence must match the trainer's."""
        if self.sync_ids is None or self.engine.shares_weights:
            return None  # the engine samples from the trainer's own module: nothing can drift
        tolerance = TOLERANCE[self.engine.dtype]
        return check_sync(self.engine, self.model, self.sync_ids, tolerance)

    # -- for other stacks and tests ------------------------------------------------------------------

    def rollout_batch(self) -> StepBatch:
        """Sample and score the next rollout batch (the first stages of `step`)."""
        examples = self.next_examples()
        examples, rollouts = self.training_share(examples, self.generate(examples))
        return self.score(rollouts, examples)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The trained parameters by checkpoint name (what a checkpoint and a weight push carry)."""
        return {n: p.detach() for n, p in self.trained.items()}

    @property
    def label(self) -> str:
        return layers_label(self.layers)

    @property
    def fused(self) -> bool:
        """Whether the fused head (no tokens x vocab tensor) computes the log-probs."""
        return self.head.fused

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups: every trained tensor at --learning-rate, --boost-layers' tensors at --boost-lr."""
        rl, m = self.config.rl, self.config.model
        if not rl.boost_layers:
            return [{"params": list(self.trained.values())}]
        if self.layers is not None:
            raise ConfigError("--boost-layers goes with --layers all (the boosted layers train faster than the rest)")
        boosted = resolve_layers(rl.boost_layers, len(decoder_layers(self.model)), m.layer_ranking)
        if boosted is None:
            raise ConfigError("--boost-layers all boosts nothing: raise --learning-rate instead")
        prefixes = tuple(f"model.layers.{k}." for k in boosted)
        fast = [p for n, p in self.trained.items() if n.startswith(prefixes)]
        rest = [p for n, p in self.trained.items() if not n.startswith(prefixes)]
        return [{"params": rest}, {"params": fast, "lr": rl.boost_lr}]

    # -- helpers -------------------------------------------------------------------------------------

    def _build_forward(self) -> CachedPrefixForward | FullForward:
        """The cached-prefix forward below the first trained layer, or full forwards (--layers all, no cache)."""
        m = self.config.model
        if self.layers is None or not m.prefix_cache:
            if m.gradient_checkpointing:  # transformers' own, on the plain path
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return FullForward(self.model)
        budget = parse_size(m.prefix_cache_budget) if m.prefix_cache_budget is not None else None
        return CachedPrefixForward(self.model, min(self.layers), m.share_prompts, budget, m.gradient_checkpointing)

    def _prepared(self, sb: StepBatch) -> tuple[CachedPrefixForward | FullForward, PreparedBatch]:
        """The forward and the prepared micro-batches of `sb`: the attached ones, or (nothing attached) plain
        full forwards, transient, so that nothing is cached on a batch its caller did not prepare."""
        if sb.inputs is not None:
            return self.forward, sb.inputs
        full = FullForward(self.model)
        return full, full.prepare(sb.batch, sb.micro_batches)

    def _old_logp_pass(self) -> bool:
        """Whether one no-grad pass takes the old-policy log-probs before the first update: --old-logp-pass where a
        later pass needs them (TRL skips it for a single pass), and always with --steps-per-generation above 1
        (the policy moves between the batch's shares)."""
        rl = self.config.rl
        return (rl.old_logp_pass and rl.num_iterations > 1) or rl.steps_per_generation > 1

    def _objective_options(self) -> ObjectiveOptions:
        """The objective's settings from --loss-type, --epsilon[-high], --beta and the loss options."""
        rl = self.config.rl
        return ObjectiveOptions(rl.loss_type, rl.epsilon, rl.epsilon_high, rl.beta, rl.use_bias_correction_kl,
                                rl.importance_sampling_level, rl.sapo_temperature_pos, rl.sapo_temperature_neg)

    def _sampling_weights(self, old: torch.Tensor, sub: Any) -> torch.Tensor | None:
        """The sampler correction's weights for a micro-batch (--vllm-importance-sampling-*; --tis-cap X is mode
        token_truncate with clip max X), where the engine reported sampling log-probs (vllm, remote; not hf)."""
        rl = self.config.rl
        if sub.sampling_logp is None:
            return None
        if rl.tis_cap is not None:  # the alias
            mode, low, high = "token_truncate", None, rl.tis_cap
        elif rl.vllm_importance_sampling_correction:
            mode, low, high = (rl.vllm_importance_sampling_mode, rl.vllm_importance_sampling_clip_min,
                               rl.vllm_importance_sampling_clip_max)
        else:
            return None
        return sampling_correction(old, sub.sampling_logp, mode, low, high, sub.completion_mask)

    def _step_shares(self, sb: StepBatch) -> tuple[list[list[int]], torch.Tensor]:
        """The micro-batch indices of each optimizer step on `sb` (--steps-per-generation) and their token weights
        (each share normalised as TRL does: `objective.share_weights`)."""
        k = self.config.rl.steps_per_generation
        if k == 1:
            return [list(range(len(sb.micro_batches)))], sb.weights
        if len(sb.micro_batches) < k:
            raise ConfigError(f"--steps-per-generation {k} needs at least {k} micro-batches per rollout batch, got "
                              f"{len(sb.micro_batches)}: lower --micro-batch-size")
        shares, mask = step_shares(len(sb.micro_batches), k), sb.batch.completion_mask
        totals = None if self.world.size == 1 else [
            self._batch_totals(mask[[r for j in s for r in sb.micro_batches[j]]], [sb.micro_batches[j] for j in s])
            for s in shares]
        return shares, share_weights(mask, self.config.rl.loss_type, self.max_completion_length, sb.micro_batches,
                                     shares, totals)

    # -- data-parallel (torchrun): each rank holds whole GRPO groups of the step ------------------------

    def _rollout_seed(self) -> int:
        """Seeded by (seed, step) so a resumed run samples the same; each rank its own stream (rank 0, and a
        single process, the one it always had)."""
        return self.config.run.seed * 1_000_003 + self.step_count + self.world.engine_group(self.tp).rank * 7_919

    def _advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Group advantages stay on the rank; --scale-rewards batch divides by the std of the WHOLE batch's
        rewards, so it gathers them (ranks hold consecutive prompts: rank order is batch order)."""
        rl = self.config.rl
        if self.world.size == 1 or rl.scale_rewards != "batch":
            return group_advantages(rewards, rl.num_generations, rl.scale_rewards)
        parts = gather_objects(rewards.tolist())
        start = sum(len(p) for p in parts[: self.world.rank])
        everyone = torch.tensor([r for p in parts for r in p], dtype=rewards.dtype)
        return group_advantages(everyone, rl.num_generations, rl.scale_rewards)[start:start + len(rewards)]

    def _batch_totals(self, mask: torch.Tensor, micro: list[list[int]]) -> BatchTotals | None:
        """The whole batch's sequence, token and micro-batch counts for the loss normalisers (None in a
        single process: the batch is the whole batch)."""
        if self.world.size == 1:
            return None
        seqs, tokens, micros = all_reduce_sum([mask.shape[0], float(mask.sum()), len(micro)])
        return BatchTotals(int(seqs), int(tokens), int(micros))

    def _global_metrics(self, metrics: dict[str, Any], sb: StepBatch) -> dict[str, Any]:
        """Replace the rank's own reward, accuracy and length figures by the whole batch's, and add
        world_size and allreduce_bytes (loss, KL, clip ratio and grad norm are global already)."""
        mine = {"rewards": sb.rewards.tolist(), "correct": sb.correct.tolist(),
                "lengths": sb.batch.completion_mask.sum(dim=1).tolist(), "tokens": int(sb.batch.attention_mask.sum()),
                "functions": {k: list(v) for k, v in sb.function_rewards.items()}}
        parts = gather_objects(mine)
        rewards = torch.tensor([r for p in parts for r in p["rewards"]], dtype=torch.float32)
        lengths = torch.tensor([n for p in parts for n in p["lengths"]], dtype=torch.float32)
        functions = {k: [v for p in parts for v in p["functions"][k]] for k in mine["functions"]}
        tokens = sum(p["tokens"] for p in parts)
        metrics.update({"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                        **reward_function_metrics(functions),
                        "accuracy": sum(c for p in parts for c in p["correct"]) / len(rewards),
                        "completion_length": float(lengths.mean()),
                        "tokens_per_s": tokens / metrics["step_time_s"] if metrics["step_time_s"] > 0 else math.nan,
                        "world_size": self.world.size, "allreduce_bytes": self.allreduce_bytes})
        return metrics

    @torch.no_grad()
    def batch_logprobs(self, sb: StepBatch, forward: CachedPrefixForward | FullForward, inputs: PreparedBatch,
                        head: LogProbHead) -> torch.Tensor:
        """No-grad log-probs (B x C) of the whole rollout batch, micro-batch by micro-batch."""
        out = torch.zeros(sb.batch.completion_mask.shape, device=self.device)
        for j, rows in enumerate(sb.micro_batches):
            logp = head(*forward.hidden(inputs, j))
            out[rows, : logp.shape[1]] = logp
        return out
