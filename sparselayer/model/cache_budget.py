"""A byte budget for the frozen-prefix cache on the compute device (--prefix-cache-budget).

Entries are kept on the device in the order they are computed until their tensors (hidden state,
rotary tables, masks, positions) exceed the budget; every later entry is moved to CPU memory (pinned
when the device is CUDA, so the copies back are asynchronous) and brought back for the pass that uses
it, then dropped. On a CPU device the cache is in CPU memory already: the moves are no-ops there.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .prefix_cache import LayerContext, PrefixEntry, SharedPrompts

HOST = torch.device("cpu")


def entry_bytes(entry: PrefixEntry) -> int:
    """Bytes held by one cached entry's activations (hidden state and layer context)."""
    return sum(t.numel() * t.element_size() for t in _tensors((entry.hidden, entry.context, entry.shared)))


class PrefixBudget:
    """Places cached prefix entries on the device until `budget` bytes are used, the rest in CPU memory."""

    def __init__(self, budget: int | None, device: torch.device):
        self.budget, self.device, self.used, self.spilled = budget, device, 0, 0

    def place(self, entry: PrefixEntry) -> PrefixEntry:
        """Keep `entry` on the device if it fits the budget, else move it to (pinned) CPU memory."""
        size = entry_bytes(entry)
        if self.budget is None or self.used + size <= self.budget:
            self.used += size
            return entry
        self.spilled += 1
        return move_entry(entry, HOST, pin=self.device.type == "cuda")

    def fetch(self, entry: PrefixEntry) -> PrefixEntry:
        """The entry with its tensors on the compute device (a transient copy when it was spilled)."""
        if entry.hidden.device == self.device:  # kept on the device: entries move whole
            return entry
        return move_entry(entry, self.device, non_blocking=self.device.type == "cuda")


def move_entry(entry: PrefixEntry, device: torch.device, pin: bool = False, non_blocking: bool = False) -> PrefixEntry:
    """A copy of `entry` whose activations are on `device` (tensors already there are shared, not copied)."""
    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.device == device:
            return t
        if pin:  # one copy, straight into page-locked memory
            return torch.empty_like(t, device=device, pin_memory=True).copy_(t)
        return t.to(device, non_blocking=non_blocking)

    def move_context(ctx: LayerContext) -> LayerContext:
        return LayerContext(move(ctx.position_ids), tuple(move(t) for t in ctx.position_embeddings),
                            {k: move(v) for k, v in ctx.masks.items()})

    s = entry.shared
    shared = None if s is None else SharedPrompts(move(s.index), move_context(s.context), move(s.hidden))
    return dataclasses.replace(entry, context=move_context(entry.context), hidden=move(entry.hidden), shared=shared)


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside nested tuples, dicts and LayerContexts."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, LayerContext):
        return _tensors((obj.position_ids, obj.position_embeddings, obj.masks))
    if isinstance(obj, SharedPrompts):
        return _tensors((obj.index, obj.context, obj.hidden))
    if isinstance(obj, dict):
        obj = tuple(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    return []
