"""The frozen prefix, run once per rollout batch: embeddings and the decoder layers below the first
trained layer never change within a batch, so the hidden state entering the trained layer is computed
once, with no autograd, and reused by the reference pass and every optimization pass.

Shared prompts: a GRPO group's rows carry one prompt, and under causal attention a prompt position
sees only the prompt, so its hidden state is the same in every row of the group, in every layer
(trained or not). When a micro-batch holds rows with equal prompts, each distinct prompt runs once
and every row's completion attends to its prompt's keys and values (`run_layers_shared`); gradients
reach the prompt part through those keys and values. Same maths as the full rows (tested to float32
rounding), about (G*P + B*C) / (B*(P+C)) of the work. It costs a second, smaller call of every layer,
so "auto" shares only where the saved work is worth that call (`sharing_pays`).

From the rollout (--prefix-source rollout): the engine that sampled computed the same hidden states
on its way to the next token; `prefix_from_states` lays the states it captured out as the entry
`compute_prefix` would have built, and the frozen-prefix pass is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn

from ..batch import Batch, CapturedStates
from .logprobs import plain_head_logprobs


@dataclass
class LayerContext:
    """What every decoder layer needs besides the hidden state: positions, rotary tables and masks."""

    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    masks: dict[str, torch.Tensor | None]


@dataclass
class SharedPrompts:
    """The distinct prompts of a micro-batch: row b's prompt is number index[b]."""

    index: torch.Tensor  # (B,) long
    context: LayerContext  # of the G distinct prompts' P positions
    hidden: torch.Tensor  # G x P x H


@dataclass
class PrefixEntry:
    """One micro-batch: its (trimmed) batch, the context and the hidden state entering layer `start`:
    of all B x (P+C) positions, or with `shared`, of the B x C completion positions only."""

    batch: Batch
    context: LayerContext
    hidden: torch.Tensor
    shared: SharedPrompts | None = None


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


def distinct_prompts(batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(index (B,), first row of each distinct prompt (G,)) when some rows share a prompt, else None."""
    P = batch.prompt_len
    key = torch.cat([batch.input_ids[:, :P], batch.attention_mask[:, :P]], dim=1)
    _, index = torch.unique(key, dim=0, return_inverse=True)
    G = int(index.max()) + 1
    if G == key.shape[0]:
        return None
    rows = torch.arange(key.shape[0], device=key.device)
    first = torch.full((G,), key.shape[0], device=key.device, dtype=rows.dtype).scatter_reduce(0, index, rows, "amin")
    return index, first


# Saved work (FLOPs per layer and micro-batch) from which "auto" shares prompts. CPU, measured on the
# 2-core machine: the embedded model (hidden 64, 28 rows x 8 prompt tokens saved, 2.8e7) ran 15-20%
# slower shared; the step benchmark's shape (5.6e9) 1.43x faster. CUDA: an estimate (a layer call's
# kernel launches against far faster matmuls), not yet measured.
SHARE_MIN_FLOPS = {"cpu": 1e8, "cuda": 1e10}


def sharing_pays(model: nn.Module, batch: Batch, start: int, distinct: int) -> bool:
    """Whether running `distinct` prompts instead of every row's saves SHARE_MIN_FLOPS per layer."""
    layer_params = sum(p.numel() for p in model.model.layers[start].parameters())
    saved = (batch.input_ids.shape[0] - distinct) * batch.prompt_len * 2 * layer_params
    device = batch.input_ids.device.type
    return saved >= SHARE_MIN_FLOPS.get(device, SHARE_MIN_FLOPS["cuda"])


def _shareable(model: nn.Module, ctx: LayerContext) -> bool:
    """Prompt sharing needs 4-D (or no) masks: the sdpa and eager attention paths of transformers."""
    impl = getattr(model.config, "_attn_implementation", None)
    return impl in ("sdpa", "eager") and all(m is None or m.dim() == 4 for m in ctx.masks.values())


def _completion_mask(mask: torch.Tensor | None, P: int, C: int, eager: bool, dtype: torch.dtype) -> torch.Tensor:
    """Rows P.. of the full-sequence mask (completion queries over all keys); built when it is None
    (sdpa's unpadded causal case), as a boolean mask, or additive for eager attention."""
    if mask is not None:
        return mask[:, :, P:]
    allowed = torch.ones(C, P + C, dtype=torch.bool).tril(diagonal=P)[None, None]
    if not eager:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def split_context(model: nn.Module, ctx: LayerContext, P: int,
                  first: torch.Tensor) -> tuple[LayerContext, LayerContext]:
    """(context of the distinct prompts' P positions, context of every row's completion positions)."""
    C = ctx.position_ids.shape[1] - P
    eager = model.config._attn_implementation == "eager"
    cos, sin = ctx.position_embeddings
    dev = ctx.position_ids.device
    prompt = LayerContext(ctx.position_ids[first, :P], (cos[first, :P], sin[first, :P]),
                          {k: None if m is None else m[first, :, :P, :P] for k, m in ctx.masks.items()})
    completion = LayerContext(ctx.position_ids[:, P:], (cos[:, P:], sin[:, P:]),
                              {k: _completion_mask(m, P, C, eager, cos.dtype).to(dev) for k, m in ctx.masks.items()})
    return prompt, completion


class _PromptKV:
    """A one-layer stand-in for transformers' KV cache: the prompt pass leaves its keys and values; the
    completion pass gets, per row, its prompt's keys and values in front of its own."""

    def __init__(self, index: torch.Tensor):
        self.index, self.kv = index, None

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv is None:
            self.kv = (keys, values)
            return keys, values
        k, v = self.kv
        return torch.cat([k[self.index], keys], dim=2), torch.cat([v[self.index], values], dim=2)


def _shared_layer(layer: nn.Module, kind: str, prompt_ctx: LayerContext, completion_ctx: LayerContext,
                  index: torch.Tensor, hp: torch.Tensor, hc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer over the distinct prompts (G x P) and then the completions (B x C)."""
    cache = _PromptKV(index)
    outs = []
    for h, ctx in ((hp, prompt_ctx), (hc, completion_ctx)):
        outs.append(layer(h, attention_mask=ctx.masks[kind], position_ids=ctx.position_ids,
                          position_embeddings=ctx.position_embeddings, past_key_values=cache))
    return outs[0], outs[1]


def run_layers_shared(model: nn.Module, hp: torch.Tensor, hc: torch.Tensor, shared: SharedPrompts,
                      completion_ctx: LayerContext, start: int, stop: int,
                      checkpoint: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`run_layers` with shared prompts: (prompt hidden G x P x H, completion hidden B x C x H)."""
    inner = model.model
    layer_types = getattr(inner.config, "layer_types", None) or ["full_attention"] * len(inner.layers)
    recompute = checkpoint and torch.is_grad_enabled()
    for i in range(start, stop):
        args = (inner.layers[i], layer_types[i], shared.context, completion_ctx, shared.index, hp, hc)
        if recompute:
            hp, hc = torch.utils.checkpoint.checkpoint(_shared_layer, *args, use_reentrant=False)
        else:
            hp, hc = _shared_layer(*args)
    return hp, hc


def _sharing(model: nn.Module, batch: Batch, ctx: LayerContext, start: int,
             share_prompts: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(index, first rows) of the distinct prompts where this micro-batch runs them once, else None."""
    if share_prompts not in ("auto", "on", "off"):
        raise ValueError(f"share_prompts must be auto, on or off, got {share_prompts!r}")
    groups = distinct_prompts(batch) if share_prompts != "off" and _shareable(model, ctx) else None
    if groups is not None and share_prompts == "auto" and not sharing_pays(model, batch, start, len(groups[1])):
        return None
    return groups


@torch.no_grad()
def compute_prefix(model: nn.Module, batch: Batch, start: int, share_prompts: str = "auto") -> PrefixEntry:
    """Embeddings and layers 0 .. start-1 of one micro-batch, without autograd. Rows with equal prompts
    share the prompt part with share_prompts "on" (where the attention path allows it), "auto" (also
    only where `sharing_pays`), never with "off"."""
    embeds = model.model.embed_tokens(batch.input_ids)
    ctx = layer_context(model, batch, embeds)
    groups = _sharing(model, batch, ctx, start, share_prompts)
    if groups is None:
        return PrefixEntry(batch, ctx, run_layers(model, embeds, ctx, 0, start))
    index, first = groups
    P = batch.prompt_len
    prompt_ctx, completion_ctx = split_context(model, ctx, P, first)
    shared = SharedPrompts(index, prompt_ctx, embeds[first, :P])
    hp, hc = run_layers_shared(model, shared.hidden, embeds[:, P:], shared, completion_ctx, 0, start)
    shared.hidden = hp
    return PrefixEntry(batch, completion_ctx, hc, shared)


@torch.no_grad()
def prefix_from_states(model: nn.Module, batch: Batch, rows: list[int], states: CapturedStates,
                       share_prompts: str = "auto") -> PrefixEntry:
    """The entry `compute_prefix` builds for sub-batch `batch` (rows `rows` of the rollout batch), made from
    the states the rollout engine captured while sampling: no layer runs. Padding positions and each row's
    last token (never fed to the engine) hold zeros: no real position attends to them, and the positions
    whose outputs they feed predict nothing the loss counts."""
    P, C = batch.prompt_len, batch.input_ids.shape[1] - batch.prompt_len
    n, sample = states.group_size, states.prompts[0]
    device = batch.input_ids.device
    prompt = torch.zeros((len(rows), P, sample.shape[-1]), dtype=sample.dtype, device=device)
    completion = torch.zeros((len(rows), C, sample.shape[-1]), dtype=sample.dtype, device=device)
    for b, r in enumerate(rows):
        p, c = states.prompts[r // n], states.completions[r][:C]
        prompt[b, P - p.shape[0]:] = p
        completion[b, : c.shape[0]] = c
    ctx = layer_context(model, batch, prompt.new_zeros(()).expand(len(rows), P + C, sample.shape[-1]))
    groups = _sharing(model, batch, ctx, states.layer, share_prompts)
    if groups is None:
        return PrefixEntry(batch, ctx, torch.cat([prompt, completion], dim=1))
    index, first = groups
    prompt_ctx, completion_ctx = split_context(model, ctx, P, first)
    return PrefixEntry(batch, completion_ctx, completion, SharedPrompts(index, prompt_ctx, prompt[first]))


def hidden_from_prefix(model: nn.Module, entry: PrefixEntry, start: int, checkpoint: bool = False) -> torch.Tensor:
    """Final-norm hidden states (B x C x H) at the positions that predict completion tokens."""
    stop = len(model.model.layers)
    if entry.shared is not None:
        s = entry.shared
        hp, hc = run_layers_shared(model, s.hidden, entry.hidden, s, entry.context, start, stop, checkpoint)
        return model.model.norm(torch.cat([hp[s.index, -1:], hc[:, :-1]], dim=1))
    hidden = run_layers(model, entry.hidden, entry.context, start, stop, checkpoint)
    P = entry.batch.prompt_len
    return model.model.norm(hidden[:, P - 1 : -1])


def logprobs_from_prefix(model: nn.Module, entry: PrefixEntry, start: int, temperature: float = 1.0) -> torch.Tensor:
    """Completion log-probs (B x C) from the cached hidden state: layers start.. , final norm, head."""
    h = hidden_from_prefix(model, entry, start)
    return plain_head_logprobs(model.lm_head, h, entry.batch.input_ids[:, entry.batch.prompt_len:], temperature)
