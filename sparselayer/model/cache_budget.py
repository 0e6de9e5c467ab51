"""A byte budget for the frozen-prefix cache on the compute device (--prefix-cache-budget).

Entries are kept on the device in the order they are computed until their tensors (hidden state,
rotary tables, masks, positions) exceed the budget; every later entry is moved to CPU memory (pinned
when the device is CUDA, so the copies back are asynchronous) and brought back for the pass that uses
it, then dropped. On a CPU device the cache is in CPU memory already: the moves are no-ops there.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from .prefix_cache import LayerContext, PrefixEntry, SharedPrompts

HOST = torch.device("cpu")
NOT_ACTIVATIONS = {"batch"}  # PrefixEntry.batch (token ids): shared by an entry and its moved copies, not counted


def entry_bytes(entry: PrefixEntry) -> int:
    """Bytes held by one cached entry's activations (hidden state and layer context)."""
    return sum(t.numel() * t.element_size() for t in tensors_in(entry))


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
    def move(t: torch.Tensor) -> torch.Tensor:
        if t.device == device:
            return t
        if pin:  # one copy, straight into page-locked memory
            return torch.empty_like(t, device=device, pin_memory=True).copy_(t)
        return t.to(device, non_blocking=non_blocking)

    return map_tensors(entry, move)


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`obj` rebuilt with `fn` applied to every activation tensor it holds: the one walk over a cached
    entry's structure (PrefixEntry, SharedPrompts, LayerContext, tuples, dicts), for moving and counting.
    A PrefixEntry's batch (token ids, not activations) is left as it is; non-tensors (None masks) too."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (PrefixEntry, SharedPrompts, LayerContext)):
        names = [f.name for f in dataclasses.fields(obj) if f.name not in NOT_ACTIVATIONS]
        return dataclasses.replace(obj, **{name: map_tensors(getattr(obj, name), fn) for name in names})
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(item, fn) for item in obj)
    return obj


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every activation tensor inside `obj`, in `map_tensors` order."""
    found: list[torch.Tensor] = []

    def collect(t: torch.Tensor) -> torch.Tensor:
        found.append(t)
        return t

    map_tensors(obj, collect)
    return found
