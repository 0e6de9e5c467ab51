"""The GRPO trainer for one (or a few) trained layers: the whole step is `Trainer.step`.

rollout -> reward -> advantages -> [reference log-probs] -> num_iterations x (micro-batched
forward/backward of the trained layers' loss) -> optimizer step -> push the changed layers.
"""
from __future__ import annotations

import functools
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from .config import TrainConfig
from .errors import ConfigError
from .memory import peak_bytes, reset_peak
from .optim import build_optimizer, grad_tensors
from .model.layout import decoder_layers, freeze_except, layers_label, load_model, parse_layers
from .kernels import grpo_loss, logprobs
from .kernels.patch import resolve_kernels, use_fused_kernels
from .model.logprobs import completion_hidden, head_logprobs
from .model.cache_budget import PrefixBudget
from .model.prefix_cache import PrefixEntry, compute_prefix, hidden_from_prefix
from .model.quant import quantize_frozen, resolve_quant
from .packing import pack_balanced, pack_groups
from .rl.grpo import group_advantages, per_token_loss, tis_weights, token_weights
from .rollout.base import Batch, RolloutEngine, Rollouts, collate
from .rollout import build_engine
from .rollout.sync import TOLERANCE, check_sync, sync_sequence
from .sizes import parse_size
from .tasks import Example, Task, build_task


class PhaseTimer:
    """Consecutive phase marks: the phases partition the step, so they add up to step_time_s."""

    def __init__(self):
        self.last, self.phases = time.perf_counter(), {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.last
        self.last = now


class PromptSampler:
    """Epoch-wise shuffled prompt order, fully determined by the seed and the position (resumable)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed

    def take(self, position: int, count: int) -> list[int]:
        """Indices of the prompts at positions position .. position+count-1 of the endless order."""
        return [self._order(pos // self.size)[pos % self.size] for pos in range(position, position + count)]

    @functools.lru_cache(maxsize=2)
    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        random.Random(self.seed * 7919 + epoch).shuffle(order)
        return order


@dataclass
class StepBatch:
    """One rollout batch, ready for the loss: tensors, advantages, weights and micro-batches."""

    batch: Batch
    advantages: torch.Tensor
    weights: torch.Tensor
    micro_batches: list[list[int]]
    rewards: torch.Tensor
    correct: torch.Tensor
    ref_logp: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    prefix: list[PrefixEntry] | None = None  # per micro-batch, when the prefix cache is on
    prefix_budget: PrefixBudget | None = None  # where those entries live (device or CPU memory)


class Trainer:
    """GRPO over the trained layers only; everything else is frozen (no grads, no optimizer state)."""

    def __init__(self, config: TrainConfig, task: Task | None = None, engine: RolloutEngine | None = None):
        self.config = config.validate()
        m = config.model
        self.task = task or build_task(config.task.task, config.task.dataset, config.task.reward)
        self.model, self.tokenizer = load_model(m.model, m.dtype, m.device, m.attn_implementation)
        self.device = next(self.model.parameters()).device
        self.layers = parse_layers(m.layers, len(decoder_layers(self.model)), m.layer_ranking)
        self.trained = freeze_except(self.model, self.layers)
        self.quant = resolve_quant(m.quant, self.device, self.layers)  # frozen decoder layers via bitsandbytes
        quantize_frozen(self.model, self.layers, self.quant)
        self.kernels = resolve_kernels(m.kernels, self.device)  # --kernels: "torch" or "triton" from here on
        if m.fused_layers:  # fused RMSNorm/SwiGLU where autograd runs (trained layers and above)
            use_fused_kernels(self.model, self.layers, self.kernels)
        self.prefix_budget = parse_size(m.prefix_cache_budget) if m.prefix_cache_budget is not None else None
        # first trained layer: the prefix below it is cached (None: no cache, e.g. --layers all)
        self.cache_start = min(self.layers) if self.layers is not None and m.prefix_cache else None
        # the fused head/loss returns dL/dhidden only, so it needs a frozen LM head
        self.fused = m.fused_loss and not self.model.lm_head.weight.requires_grad
        if m.gradient_checkpointing and self.cache_start is None:  # the plain path: transformers' own
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.engine = engine or build_engine(config, self.model, self.tokenizer)
        self.sync_ids = sync_sequence(self.tokenizer, self.task) if config.rollout.check_sync else None
        if self.sync_ids is not None and self.quant != "none":
            raise ConfigError("--check-sync compares with the trainer's unquantized forward: use --quant none")
        self.push_bytes = 0  # bytes of the last weight push
        self.max_completion_length = (config.rollout.max_completion_length
                                      or self.task.suggested_max_completion_length)
        rl = config.rl
        self.optimizer = build_optimizer(self.param_groups(), config)  # fp32 masters for bf16; --optim
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / rl.warmup_steps) if rl.warmup_steps else 1.0)
        self.reference = ({n: p.detach().clone() for n, p in self.trained.items()} if rl.beta > 0 else None)
        self.sampler = PromptSampler(len(self.task.train), config.run.seed)
        self.step_count = 0

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups: every trained tensor at --learning-rate, --boost-layers' tensors at --boost-lr."""
        rl, m = self.config.rl, self.config.model
        if not rl.boost_layers:
            return [{"params": list(self.trained.values())}]
        if self.layers is not None:
            raise ConfigError("--boost-layers goes with --layers all (the boosted layers train faster than the rest)")
        boosted = parse_layers(rl.boost_layers, len(decoder_layers(self.model)), m.layer_ranking)
        if boosted is None:
            raise ConfigError("--boost-layers all boosts nothing: raise --learning-rate instead")
        prefixes = tuple(f"model.layers.{k}." for k in boosted)
        fast = [p for n, p in self.trained.items() if n.startswith(prefixes)]
        rest = [p for n, p in self.trained.items() if not n.startswith(prefixes)]
        return [{"params": rest}, {"params": fast, "lr": rl.boost_lr}]

    @property
    def label(self) -> str:
        return layers_label(self.layers)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The trained parameters by checkpoint name (what a checkpoint and a weight push carry)."""
        return {n: p.detach() for n, p in self.trained.items()}

    def step(self) -> dict[str, Any]:
        """One GRPO step on a fresh rollout batch; returns its metrics line."""
        rl = self.config.rl
        reset_peak(self.device)
        timer = PhaseTimer()
        examples = self._next_examples()
        rollouts = self._generate(examples)
        timer.mark("rollout_s")
        sb = self._score(rollouts, examples)
        timer.mark("reward_s")
        self.attach_prefix(sb)
        shared = sum(e.shared is not None for e in sb.prefix or [])
        if rl.beta > 0:
            sb.ref_logp = self._reference_logprobs(sb)
        timer.mark("logprob_s")
        losses = [self._optimize(sb, it) for it in range(rl.num_iterations)]
        sb.prefix = None  # the batch is done: free its cached activations before the push
        timer.mark("train_s")
        self.push_bytes = self.engine.update_weights(self.trained_state().items())
        self.check_sync()
        timer.mark("push_s")
        self.step_count += 1
        return {**self._metrics(sb, losses, timer.phases), "shared_micro_batches": shared}

    def check_sync(self) -> float | None:
        """--check-sync: after a push the engine's log-probs of a fixed sequence must match the trainer's."""
        if self.sync_ids is None or not hasattr(self.engine, "prompt_logprobs"):
            return None  # the hf engine samples from the trainer's own module
        tolerance = TOLERANCE[getattr(self.engine, "dtype", torch.float32)]
        return check_sync(self.engine, self.model, self.sync_ids, tolerance)

    def _next_examples(self) -> list[Example]:
        idx = self.sampler.take(self.step_count * self.config.rl.prompts_per_step, self.config.rl.prompts_per_step)
        return [self.task.train[i] for i in idx]

    def _score(self, rollouts: Rollouts, examples: list[Example]) -> StepBatch:
        """Rewards, correctness and group advantages of the completions; micro-batches and token weights."""
        rl, n = self.config.rl, self.config.rl.num_generations
        texts = self.tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        per_row = [e for e in examples for _ in range(n)]
        rewards = torch.tensor(self.task.rewards(texts, per_row), dtype=torch.float32)
        correct = torch.tensor([self.task.is_correct(t, e) for t, e in zip(texts, per_row)], dtype=torch.float32)
        batch = collate(rollouts, self.tokenizer.pad_token_id, self.device)
        if self.cache_start is not None and self.config.model.share_prompts != "off":  # groups together
            micro = pack_groups(batch.lengths(), n, rl.micro_batch_size)
        else:
            micro = pack_balanced(batch.lengths(), rl.micro_batch_size)
        weights = token_weights(batch.completion_mask, rl.loss_type, self.max_completion_length, micro)
        adv = group_advantages(rewards, n, rl.scale_rewards).to(self.device)
        return StepBatch(batch, adv, weights, micro, rewards, correct)

    def attach_prefix(self, sb: StepBatch) -> None:
        """Run the frozen prefix of every micro-batch once and keep its output for all passes."""
        if self.cache_start is not None:
            budget = PrefixBudget(self.prefix_budget, self.device)  # beyond it, entries wait in CPU memory
            share = self.config.model.share_prompts
            sb.prefix = [budget.place(compute_prefix(self.model, sb.batch.rows(rows), self.cache_start, share))
                         for rows in sb.micro_batches]
            sb.prefix_budget = budget

    def _policy_hidden(self, sb: StepBatch, j: int) -> tuple[torch.Tensor, Batch]:
        """Final hidden states (B' x C x H) of micro-batch j: from the cached prefix, else a full forward."""
        if sb.prefix is not None:
            entry = sb.prefix_budget.fetch(sb.prefix[j])
            checkpoint = self.config.model.gradient_checkpointing
            return hidden_from_prefix(self.model, entry, self.cache_start, checkpoint), entry.batch
        sub = sb.batch.rows(sb.micro_batches[j])
        return completion_hidden(self.model, sub), sub

    def _head_logprobs(self, h: torch.Tensor, sub: Batch) -> torch.Tensor:
        """Completion log-probs (B' x C) through the LM head: fused when the head is frozen, else plain."""
        targets = sub.input_ids[:, sub.prompt_len:]
        temperature = self.config.rollout.temperature
        if self.fused and not torch.is_grad_enabled():
            flat = logprobs(h.reshape(-1, h.shape[-1]), self.model.lm_head.weight, targets.reshape(-1), temperature,
                            backend=self.kernels)
            return flat.view(targets.shape)
        return head_logprobs(self.model.lm_head, h, targets, temperature)

    def _policy_logprobs(self, sb: StepBatch, j: int) -> tuple[torch.Tensor, Batch]:
        """Log-probs of micro-batch j and the (trimmed) batch they belong to."""
        h, sub = self._policy_hidden(sb, j)
        return self._head_logprobs(h, sub), sub

    @torch.no_grad()
    def _reference_logprobs(self, sb: StepBatch) -> torch.Tensor:
        """Log-probs under the original weights of the trained layers (swapped in, then back)."""
        current = {n: p.detach().clone() for n, p in self.trained.items()}
        for n, p in self.trained.items():
            p.copy_(self.reference[n])
        try:
            return self._logprobs_no_grad(sb)
        finally:
            for n, p in self.trained.items():
                p.copy_(current[n])

    @torch.no_grad()
    def _logprobs_no_grad(self, sb: StepBatch) -> torch.Tensor:
        out = torch.zeros(sb.batch.completion_mask.shape, device=self.device)
        for j, rows in enumerate(sb.micro_batches):
            logp, _ = self._policy_logprobs(sb, j)
            out[rows, : logp.shape[1]] = logp
        return out

    def _optimize(self, sb: StepBatch, iteration: int) -> dict[str, float]:
        """One pass over the rollout batch: accumulate gradients over micro-batches, then one optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        stats = self.accumulate_gradients(sb, iteration)
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(grad_tensors(self.optimizer),
                                                                   self.config.rl.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        return stats

    def accumulate_gradients(self, sb: StepBatch, iteration: int = 0) -> dict[str, float]:
        """Add d(batch loss)/d(trained params) to .grad, one micro-batch at a time (for a bf16/fp16 model,
        to the fp32 masters' .grad: see `sparselayer.optim.grad_tensors`).

        In the first pass the policy has not moved, so its log-probs are the old-policy log-probs:
        they are stored for later passes and no separate old-policy pass is needed.
        """
        rl = self.config.rl
        eps_high = rl.epsilon_high if rl.epsilon_high is not None else rl.epsilon
        if iteration == 0:
            sb.old_logp = torch.zeros(sb.batch.completion_mask.shape, device=self.device)
        total = {"loss": 0.0, "kl": 0.0, "clip": 0.0}
        self.model.train()
        for j, rows in enumerate(sb.micro_batches):
            h, sub = self._policy_hidden(sb, j)
            C = h.shape[1]
            old = None if iteration == 0 else sb.old_logp[rows, :C]  # pass 0 is on-policy: old = logp
            ref = sb.ref_logp[rows, :C] if sb.ref_logp is not None else None
            loss, logp = self._loss(h, sub, old, sb.advantages[rows], sb.weights[rows, :C], ref)
            loss.backward()
            if iteration == 0:
                sb.old_logp[rows, :C] = logp.detach()
            with torch.no_grad():  # diagnostics only
                tl = per_token_loss(logp.detach(), sb.old_logp[rows, :C], sb.advantages[rows], rl.epsilon, eps_high,
                                    rl.beta, ref)
            m = sub.completion_mask.float()
            total["loss"] += loss.item()
            total["kl"] += float((tl.kl * m).sum())
            total["clip"] += float((tl.clipped.float() * m).sum())
        self.model.eval()
        ntok = float(sb.batch.completion_mask.sum().clamp(min=1))
        return {"loss": total["loss"], "kl": total["kl"] / ntok, "clip_ratio": total["clip"] / ntok}

    def _tis_active(self, sub: Batch) -> bool:
        """--tis-cap is set and the engine reported its sampling log-probs."""
        return self.config.rl.tis_cap is not None and sub.sampling_logp is not None

    def _tis(self, sub: Batch, old: torch.Tensor) -> torch.Tensor | None:
        """--tis-cap weights min(trainer/sampler probability ratio, cap) from the old log-probs, or None."""
        if not self._tis_active(sub):
            return None
        return tis_weights(old, sub.sampling_logp, self.config.rl.tis_cap, sub.completion_mask)

    def _loss(self, h: torch.Tensor, sub: Batch, old: torch.Tensor | None, adv: torch.Tensor,
              weights: torch.Tensor, ref: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted GRPO loss of one micro-batch, its log-probs B' x C): fused head + loss, or plain autograd.
        old=None is the on-policy pass 0, where the old log-probs are the policy's own (detached)."""
        rl = self.config.rl
        eps_high = rl.epsilon_high if rl.epsilon_high is not None else rl.epsilon
        B, C, H = h.shape
        if self.fused:
            if old is None and self._tis_active(sub):  # the kernel takes the weights as input: old first
                with torch.no_grad():
                    old = self._head_logprobs(h.detach(), sub)
            tis = None if old is None else self._tis(sub, old)
            flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
            loss, logp = grpo_loss(h.reshape(-1, H), self.model.lm_head.weight, flat(sub.input_ids[:, sub.prompt_len:]),
                                   flat(old), adv.repeat_interleave(C), flat(weights), rl.epsilon, eps_high, rl.beta,
                                   flat(ref), flat(tis), self.config.rollout.temperature, backend=self.kernels)
            return loss, logp.view(B, C)
        logp = self._head_logprobs(h, sub)
        old = logp.detach() if old is None else old
        tl = per_token_loss(logp, old, adv, rl.epsilon, eps_high, rl.beta, ref, self._tis(sub, old))
        return (tl.loss * weights).sum(), logp

    def rollout_batch(self) -> StepBatch:
        """Sample and score the next rollout batch (the first half of `step`, for tests and other stacks)."""
        examples = self._next_examples()
        return self._score(self._generate(examples), examples)

    def _generate(self, examples: list[Example]) -> Rollouts:
        """Completions for this step's prompts, seeded by (seed, step) so a resumed run samples the same."""
        rl, ro = self.config.rl, self.config.rollout
        return self.engine.generate([e.prompt for e in examples], rl.num_generations, self.max_completion_length,
                                    ro.temperature, ro.top_p, seed=self.config.run.seed * 1_000_003 + self.step_count)

    def _metrics(self, sb: StepBatch, losses: list[dict[str, float]], phases: dict[str, float]) -> dict[str, Any]:
        step_time = sum(phases.values())
        tokens = int(sb.batch.attention_mask.sum())
        return {
            "step": self.step_count,
            "reward_mean": float(sb.rewards.mean()),
            "reward_std": float(sb.rewards.std()),
            "accuracy": float(sb.correct.mean()),
            "loss": sum(l["loss"] for l in losses) / len(losses),
            "kl": losses[0]["kl"],
            "clip_ratio": sum(l["clip_ratio"] for l in losses) / len(losses),
            "grad_norm": losses[-1]["grad_norm"],
            "completion_length": float(sb.batch.completion_mask.sum(dim=1).float().mean()),
            "learning_rate": self.scheduler.get_last_lr()[0],
            "step_time_s": step_time,
            **{k: phases.get(k, 0.0) for k in ("rollout_s", "reward_s", "logprob_s", "train_s", "push_s")},
            "push_bytes": self.push_bytes,
            "tokens_per_s": tokens / step_time if step_time > 0 else math.nan,
            "peak_mem_bytes": peak_bytes(self.device),
        }
