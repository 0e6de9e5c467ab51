"""Per-token log-probabilities of completion tokens under the model, at a sampling temperature."""
from __future__ import annotations

import torch
from torch import nn

from ..batch import Batch


def completion_hidden(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Final hidden states (B x C x H) at the positions that predict completion tokens (plain HF forward)."""
    position_ids = (batch.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=position_ids, use_cache=False).last_hidden_state
    return hidden[:, batch.prompt_len - 1 : -1]


def plain_head_logprobs(lm_head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """Plain (materialized-logits) log p(target) through the LM head at a temperature: (B x C)."""
    logits = lm_head(h).float() / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)


def completion_logprobs(model: nn.Module, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """log p(token_t | prefix) for each completion position (B x C); the head runs on completion rows only."""
    return plain_head_logprobs(model.lm_head, completion_hidden(model, batch), batch.input_ids[:, batch.prompt_len:],
                         temperature)
