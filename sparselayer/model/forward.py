"""The forward that turns a micro-batch into final hidden states: one of two strategies.

`CachedPrefixForward` runs the frozen layers below the first trained layer once per rollout batch
(`prepare`) and every pass from there up (`hidden`), sharing a group's prompt where it pays and
spilling cached entries beyond a byte budget to CPU memory; where the rollout engine captured the
states entering the first trained layer (--prefix-source rollout), `prepare` lays those out instead.
`FullForward` runs the whole model in every pass, as a standard trainer does (and as `--layers all`
must). Both also choose how a rollout batch is cut into micro-batches (`pack`): prompt sharing needs a
group's rows together.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..batch import Batch, CapturedStates
from ..packing import pack_balanced, pack_groups
from .cache_budget import PrefixBudget
from .logprobs import completion_hidden
from .prefix_cache import PrefixEntry, compute_prefix, hidden_from_prefix, prefix_from_states


@dataclass
class PreparedBatch:
    """A rollout batch's micro-batches, ready for every pass: cached prefix entries or plain sub-batches."""

    items: list[PrefixEntry] | list[Batch]
    budget: PrefixBudget | None = None  # where cached entries live (device, or spilled to CPU memory)
    shared: int = field(init=False)  # micro-batches whose prompts run once per group

    def __post_init__(self) -> None:
        self.shared = sum(getattr(e, "shared", None) is not None for e in self.items)


class FullForward:
    """Every pass runs embeddings and all decoder layers (no cache): what a standard trainer does."""

    def __init__(self, model: nn.Module):
        self.model = model

    def pack(self, batch: Batch, group_size: int, micro_batch_size: int) -> list[list[int]]:
        """Micro-batches balanced by token count."""
        return pack_balanced(batch.lengths(), micro_batch_size)

    def prepare(self, batch: Batch, micro_batches: list[list[int]],
                states: CapturedStates | None = None) -> PreparedBatch:
        """The trimmed sub-batch of each micro-batch (nothing to precompute; captured `states` go unused)."""
        return PreparedBatch([batch.rows(rows) for rows in micro_batches])

    def hidden(self, prepared: PreparedBatch, j: int) -> tuple[torch.Tensor, Batch]:
        """Final hidden states (B' x C x H) of micro-batch j and the sub-batch they belong to."""
        sub = prepared.items[j]
        return completion_hidden(self.model, sub), sub


class CachedPrefixForward:
    """Layers below `start` once per rollout batch, without autograd; layers from `start` up per pass."""

    def __init__(self, model: nn.Module, start: int, share_prompts: str = "auto", budget_bytes: int | None = None,
                 checkpoint: bool = False):
        self.model, self.start, self.share_prompts = model, start, share_prompts
        self.budget_bytes, self.checkpoint = budget_bytes, checkpoint
        self.device = next(model.parameters()).device

    def pack(self, batch: Batch, group_size: int, micro_batch_size: int) -> list[list[int]]:
        """Micro-batches that keep GRPO groups together (so their prompt can run once), unless sharing is off."""
        if self.share_prompts == "off":
            return pack_balanced(batch.lengths(), micro_batch_size)
        return pack_groups(batch.lengths(), group_size, micro_batch_size)

    def prepare(self, batch: Batch, micro_batches: list[list[int]],
                states: CapturedStates | None = None) -> PreparedBatch:
        """The frozen prefix of every micro-batch, kept on the device up to the byte budget: computed here,
        or laid out from the `states` the rollout engine captured entering layer `start` (no layer runs)."""
        if states is not None and states.layer != self.start:
            raise ValueError(f"captured states enter layer {states.layer}, the prefix ends at layer {self.start}")
        budget = PrefixBudget(self.budget_bytes, self.device)
        entries = [budget.place(self._entry(batch.rows(rows), rows, states)) for rows in micro_batches]
        return PreparedBatch(entries, budget)

    def _entry(self, sub: Batch, rows: list[int], states: CapturedStates | None) -> PrefixEntry:
        if states is None:
            return compute_prefix(self.model, sub, self.start, self.share_prompts)
        return prefix_from_states(self.model, sub, rows, states, self.share_prompts)

    def hidden(self, prepared: PreparedBatch, j: int) -> tuple[torch.Tensor, Batch]:
        """Final hidden states (B' x C x H) of micro-batch j from its cached prefix, and its sub-batch."""
        entry = prepared.budget.fetch(prepared.items[j])
        return hidden_from_prefix(self.model, entry, self.start, self.checkpoint), entry.batch
