"""`FusedLMHeadGRPOLoss`: the GRPO loss through a frozen LM head as an `nn.Module` any trainer can drop in.

The trainer keeps its own model and optimizer; it hands over the final hidden states of the completion
positions, the frozen head weight and the batch's GRPO tensors, and gets back the loss, whose backward
gives dL/dhidden only (the head weight gets none). No tokens x vocab tensor is built, forward or
backward: the log-probs come from the fused head (`head_logprobs`) and the loss from the one objective
(`sparselayer.objective`), exactly as in sparselayer's own trainer.
"""
from __future__ import annotations

import torch
from torch import nn

from ..objective import BatchTotals, ObjectiveOptions, sampling_correction, token_weights
from .grpo_loss import weighted_loss
from .head_logprobs import head_logprobs


class FusedLMHeadGRPOLoss(nn.Module):
    """GRPO-family loss of B x T completions through a frozen LM head, settings named as in TRL's GRPOConfig.

    Args:
        loss_type: grpo | dapo | dr_grpo | bnpo | cispo | sapo (docs/objective.md)
        epsilon, epsilon_high: the clip range [1 - epsilon, 1 + epsilon_high] (epsilon_high unset: epsilon)
        beta: coefficient of the k3 KL to the reference log-probs (0: none)
        temperature: the sampling temperature the log-probs are taken at
        use_bias_correction_kl: with beta > 0, the KL term times the importance ratio (TRL's default)
        importance_sampling_level: token | sequence (GSPO)
        sapo_temperature_pos, sapo_temperature_neg: sapo's temperatures for positive / other advantages
        vllm_importance_sampling_mode: token_truncate | token_mask | sequence_truncate | sequence_mask, applied
            when `sampling_logp` is passed to forward; None: no sampler correction
        vllm_importance_sampling_clip_min, vllm_importance_sampling_clip_max: its bounds
        max_completion_length: dr_grpo's normaliser (unset: the batch's T)
        backend: auto (Triton on CUDA, chunked PyTorch elsewhere) | torch | triton
    """

    def __init__(self, loss_type: str = "dapo", epsilon: float = 0.2, epsilon_high: float | None = None,
                 beta: float = 0.0, temperature: float = 1.0, use_bias_correction_kl: bool = True,
                 importance_sampling_level: str = "token", sapo_temperature_pos: float = 1.0,
                 sapo_temperature_neg: float = 1.05, vllm_importance_sampling_mode: str | None = "sequence_mask",
                 vllm_importance_sampling_clip_min: float | None = None,
                 vllm_importance_sampling_clip_max: float | None = 3.0, max_completion_length: int | None = None,
                 backend: str = "auto"):
        super().__init__()
        self.options = ObjectiveOptions(loss_type, epsilon, epsilon_high, beta, use_bias_correction_kl,
                                        importance_sampling_level, sapo_temperature_pos, sapo_temperature_neg)
        self.temperature, self.backend, self.max_completion_length = temperature, backend, max_completion_length
        self.is_mode = vllm_importance_sampling_mode
        self.is_bounds = (vllm_importance_sampling_clip_min, vllm_importance_sampling_clip_max)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, completion_ids: torch.Tensor,
                completion_mask: torch.Tensor, advantages: torch.Tensor, old_logp: torch.Tensor | None = None,
                ref_logp: torch.Tensor | None = None, sampling_logp: torch.Tensor | None = None,
                totals: BatchTotals | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, per-token log-probs B x T, 0 on padding).

        hidden: B x T x H, the final hidden states that predict `completion_ids` (B x T); weight: the frozen
        head, V x H (one that requires grad is a ValueError: it would silently get no gradient);
        completion_mask: B x T, 1 on completion tokens; advantages: (B,) or B x T; old_logp: the sampling
        policy's log-probs (unset: on-policy, the current ones detached); ref_logp: needed when beta > 0;
        sampling_logp: the sampler's own log-probs (NaN where unknown) for the correction; totals: the whole
        batch's counts when this call is one micro-batch of it (gradient accumulation), else this call's.
        """
        keep = completion_mask.bool()
        rows = torch.arange(keep.shape[0], device=keep.device).unsqueeze(1).expand_as(keep)[keep]
        logp = head_logprobs(hidden[keep], weight, completion_ids[keep], self.temperature, self.backend)
        old = logp.detach() if old_logp is None else old_logp[keep].to(logp.dtype)
        is_weights = None
        if sampling_logp is not None and self.is_mode is not None:
            is_weights = sampling_correction(old, sampling_logp[keep], self.is_mode, *self.is_bounds, seq_index=rows)
        adv = advantages[rows] if advantages.dim() == 1 else advantages[keep]
        length = self.max_completion_length or completion_mask.shape[1]
        weights = token_weights(completion_mask, self.options.loss_type, length,
                                [list(range(keep.shape[0]))], totals)[keep]
        o = self.options
        loss = weighted_loss(logp, old, adv, weights, o.epsilon, o.epsilon_high, o.beta,
                             None if ref_logp is None else ref_logp[keep], is_weights, o.loss_type, options=o,
                             seq_index=rows)
        full = logp.new_zeros(completion_mask.shape).masked_scatter(keep, logp.detach())
        return loss, full
