"""Plain-PyTorch LM-head log-probs: the reference the fused `head_logprobs` is checked against.

It materializes the full tokens x vocab logits (matmul, log_softmax, gather), which is exactly what the
fused paths avoid. Autograd gives every gradient (hidden's and, if it requires grad, the weight's).
"""
from __future__ import annotations

import torch

from .backend import accumulation_dtype


def reference_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """log softmax(hidden @ weight.T / temperature)[target] per token (N,), via materialized N x V logits."""
    acc = accumulation_dtype(hidden)
    logits = hidden.to(acc) @ weight.to(acc).T
    if temperature != 1.0:
        logits = logits / temperature
    return logits.log_softmax(dim=-1).gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
