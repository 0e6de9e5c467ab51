"""The frozen prefix, run once per rollout batch: embeddings and the decoder layers below the first
trained layer never change within a batch, so the hidden state entering the trained layer is computed
once, with no autograd, and reused by the reference pass and every optimization pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn

from ..rollout.base import Batch
from .logprobs import head_logprobs


@dataclass
class LayerContext:
    """What every decoder layer needs besides the hidden state: positions, rotary tables and masks."""

    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    masks: dict[str, torch.Tensor | None]


@dataclass
class PrefixEntry:
    """One micro-batch: its (trimmed) batch, the context, and the hidden state entering layer `start`."""

    batch: Batch
    context: LayerContext
    hidden: torch.Tensor


def layer_context(model: nn.Module, batch: Batch, embeds: torch.Tensor) -> LayerContext:
    """Positions, rotary embeddings and attention masks exactly as the HF model builds them."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    inner = model.model
    position_ids = (batch.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    kwargs = {"config": inner.config, "inputs_embeds": embeds, "attention_mask": batch.attention_mask,
              "past_key_values": None, "position_ids": position_ids}
    masks = {"full_attention": create_causal_mask(**kwargs)}
    if getattr(inner, "has_sliding_layers", False):
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    return LayerContext(position_ids, inner.rotary_emb(embeds, position_ids), masks)


def run_layers(model: nn.Module, hidden: torch.Tensor, ctx: LayerContext, start: int, stop: int,
               checkpoint: bool = False) -> torch.Tensor:
    """Decoder layers start .. stop-1 applied to `hidden`; with `checkpoint`, each layer keeps only its
    input for the backward and recomputes the rest (less memory, one more forward of those layers)."""
    inner = model.model
    layer_types = getattr(inner.config, "layer_types", None) or ["full_attention"] * len(inner.layers)
    recompute = checkpoint and torch.is_grad_enabled()
    for i in range(start, stop):
        kwargs = {"attention_mask": ctx.masks[layer_types[i]], "position_ids": ctx.position_ids,
                  "position_embeddings": ctx.position_embeddings}
        if recompute:
            hidden = torch.utils.checkpoint.checkpoint(inner.layers[i], hidden, use_reentrant=False, **kwargs)
        else:
            hidden = inner.layers[i](hidden, **kwargs)
    return hidden


@torch.no_grad()
def compute_prefix(model: nn.Module, batch: Batch, start: int) -> PrefixEntry:
    """Embeddings and layers 0 .. start-1 of one micro-batch, without autograd."""
    embeds = model.model.embed_tokens(batch.input_ids)
    ctx = layer_context(model, batch, embeds)
    return PrefixEntry(batch, ctx, run_layers(model, embeds, ctx, 0, start))


def hidden_from_prefix(model: nn.Module, entry: PrefixEntry, start: int, checkpoint: bool = False) -> torch.Tensor:
    """Final-norm hidden states (B x C x H) at the positions that predict completion tokens."""
    hidden = run_layers(model, entry.hidden, entry.context, start, len(model.model.layers), checkpoint)
    P = entry.batch.prompt_len
    return model.model.norm(hidden[:, P - 1 : -1])


def logprobs_from_prefix(model: nn.Module, entry: PrefixEntry, start: int, temperature: float = 1.0) -> torch.Tensor:
    """Completion log-probs (B x C) from the cached hidden state: layers start.. , final norm, head."""
    h = hidden_from_prefix(model, entry, start)
    return head_logprobs(model.lm_head, h, entry.batch.input_ids[:, entry.batch.prompt_len:], temperature)
