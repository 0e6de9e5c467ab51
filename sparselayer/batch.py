"""The data of one training step, bottom of the package: rollouts, their padded tensors, and the
step's typed record.

Rollouts (token ids from an engine) -> `collate` -> Batch (padded tensors) -> `StepBatch` (the
record the GRPO step fills stage by stage, each field where it is computed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class CapturedStates:
    """The residual stream entering decoder layer `layer` (the lowest trained one), as the rollout engine
    computed it while sampling, so that the trainer can skip its frozen-prefix pass (--prefix-source).

    Prompt states are kept once per GRPO group (rows g*n .. g*n+n-1 share prompt g), as shared prompts
    need; completion states per row, one per fed token: the last sampled token is never fed back, so a
    completion of c tokens has c - 1 of them.
    """

    layer: int
    prompts: list[torch.Tensor]  # per prompt: len(prompt) x H
    completions: list[torch.Tensor]  # per row: (len(completion) - 1) x H

    @property
    def group_size(self) -> int:
        """Rows per prompt."""
        return len(self.completions) // max(len(self.prompts), 1)

    def nbytes(self) -> int:
        """Bytes the states hold (what capturing costs in memory)."""
        return sum(t.numel() * t.element_size() for t in [*self.prompts, *self.completions])


@dataclass
class Rollouts:
    """Completions in prompt-major order: prompt i's generations are rows i*n .. i*n+n-1."""

    prompt_ids: list[list[int]]  # one per row (repeated across a prompt's generations)
    completion_ids: list[list[int]]  # cut after the first EOS, which is kept
    sampling_logprobs: list[list[float]] | None = None  # per completion token, if the engine reports them
    states: CapturedStates | None = field(default=None, compare=False)  # where the engine captured them


@dataclass
class Batch:
    """Padded tensors of one rollout batch: [left-padded prompt | right-padded completion]."""

    input_ids: torch.Tensor  # B x (P + C)
    attention_mask: torch.Tensor  # B x (P + C)
    completion_mask: torch.Tensor  # B x C, 1 on completion tokens (EOS included)
    prompt_len: int  # P
    sampling_logp: torch.Tensor | None = None  # B x C, the rollout engine's log-probs of the sampled tokens
    states: CapturedStates | None = None  # the engine's captured prefix states (whole batch only, not in rows())

    def rows(self, rows: list[int]) -> Batch:
        """The sub-batch `rows`, trimmed to its own longest prompt and completion (less padding)."""
        idx = torch.tensor(rows, device=self.input_ids.device)
        mask = self.attention_mask[idx]
        P = self.prompt_len
        p_len = int(mask[:, :P].sum(dim=1).max())
        c_len = max(int(self.completion_mask[idx].sum(dim=1).max()), 1)
        cols = slice(P - p_len, P + c_len)
        sampling = None if self.sampling_logp is None else self.sampling_logp[idx, :c_len]
        return Batch(self.input_ids[idx, cols], mask[:, cols], self.completion_mask[idx, :c_len], p_len, sampling)

    def lengths(self) -> list[int]:
        """Real (unpadded) tokens per row, for balancing micro-batches."""
        return self.attention_mask.sum(dim=1).tolist()


def collate(rollouts: Rollouts, pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """Pad prompts on the left and completions on the right into one Batch."""
    P = max(map(len, rollouts.prompt_ids))
    C = max(1, max(map(len, rollouts.completion_ids)))
    B = len(rollouts.prompt_ids)
    input_ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    attention = torch.zeros((B, P + C), dtype=torch.long)
    for i, (p, c) in enumerate(zip(rollouts.prompt_ids, rollouts.completion_ids)):
        input_ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        input_ids[i, P : P + len(c)] = torch.tensor(c, dtype=torch.long)
        attention[i, P - len(p) : P + len(c)] = 1
    return Batch(input_ids.to(device), attention.to(device), attention[:, P:].to(device), P,
                 _pad_logprobs(rollouts.sampling_logprobs, C, device), rollouts.states)


def _pad_logprobs(rows: list[list[float]] | None, width: int, device: torch.device | str) -> torch.Tensor | None:
    """Per-token sampling log-probs as a right-padded B x C tensor (None when the engine gave none)."""
    if rows is None:
        return None
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out.to(device)


@dataclass
class StepBatch:
    """One rollout batch on its way through the GRPO step. Who sets what, in step order:

    score: batch, rewards (the weighted sum), function_rewards, correct, advantages, micro_batches, weights,
    prompts and completions (the text each row was sampled from and sampled; for --log-completions);
    attach_prefix (the forward's `prepare`): inputs, set to None again when the step is done with them
    (without inputs the passes run plain full forwards);
    the reference pass: ref_logp (beta > 0);
    old_logp: the separate old-policy pass (--old-logp-pass), else the first optimization pass,
    whose own log-probs are the old policy's (the policy has not moved yet).
    """

    batch: Batch
    rewards: torch.Tensor  # (B,)
    correct: torch.Tensor  # (B,) 1.0 where the task counts the completion correct
    advantages: torch.Tensor  # (B,) group-relative
    micro_batches: list[list[int]]  # row indices of each micro-batch
    weights: torch.Tensor  # B x C token weights of the loss type (the batch loss is sum(w * l))
    inputs: Any = None  # a model.forward.PreparedBatch (cached prefix entries or sub-batches); None once freed
    ref_logp: torch.Tensor | None = None  # B x C, under the reference policy
    old_logp: torch.Tensor | None = None  # B x C, under the policy that sampled (before this step's updates)
    # each reward function's value per completion, by metrics name (None: not applicable to that completion)
    function_rewards: dict[str, list[float | None]] = field(default_factory=dict)
    prompts: list[Any] = field(default_factory=list)  # each row's prompt: text, or a conversation (list of messages)
    completions: list[str] = field(default_factory=list)  # each row's completion, decoded
