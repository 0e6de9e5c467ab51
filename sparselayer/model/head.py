"""The LM head as the step uses it: final hidden states in, log-probs of the completion tokens out.

Fused (`sparselayer.kernels.head_logprobs`): no tokens x vocab tensor, gradient for the hidden
states only, so it needs a frozen head. Plain (`model.logprobs.plain_head_logprobs`): materialized
logits through the module in its own dtype, autograd
for everything (a trained head, or `--no-fused-loss`). Either way the loss is the one objective
applied to these log-probs; autograd carries dL/dlogp back through whichever head ran.
"""
from __future__ import annotations

import torch
from torch import nn

from ..batch import Batch
from ..kernels import head_logprobs
from .logprobs import plain_head_logprobs


class LogProbHead:
    """log p(completion token) at the sampling temperature: fused when the head is frozen and fusing is on."""

    def __init__(self, lm_head: nn.Module, temperature: float = 1.0, fused: bool = True, backend: str = "torch"):
        self.lm_head, self.temperature, self.backend = lm_head, temperature, backend
        self.fused = fused and not lm_head.weight.requires_grad

    def __call__(self, hidden: torch.Tensor, sub: Batch) -> torch.Tensor:
        """Log-probs (B' x C) of `sub`'s completion tokens from its final hidden states (B' x C x H)."""
        targets = sub.input_ids[:, sub.prompt_len:]
        if not self.fused:
            return plain_head_logprobs(self.lm_head, hidden, targets, self.temperature)
        flat = head_logprobs(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, targets.reshape(-1),
                                   self.temperature, backend=self.backend)
        return flat.view(targets.shape)
