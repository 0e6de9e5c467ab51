"""Which trained tensors changed since the last weight push, widened to vLLM's fused parameter groups.

vLLM stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`; its loader processes a
fused module only once every part has arrived, so a changed part brings its siblings along.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

import torch

# checkpoint-name parts that vLLM fuses into one runtime parameter
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fused_siblings(name: str) -> list[str]:
    """Checkpoint names loaded together with `name` (itself included), e.g. q_proj -> q/k/v_proj."""
    for group in FUSED_GROUPS:
        match = re.search(rf"\.({'|'.join(group)})\.", name)
        if match:
            return [name[: match.start(1)] + part + name[match.end(1):] for part in group]
    return [name]


class ChangeTracker:
    """Remembers the last pushed value of each tensor (in the engine's dtype) and reports what differs."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.pushed: dict[str, torch.Tensor] = {}

    def changed(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The tensors (converted to the engine dtype) that differ from the last push, plus fused siblings."""
        current = {n: t.detach().to(dtype=self.dtype) for n, t in named_tensors}
        dirty = {n for n, t in current.items() if n not in self.pushed or not torch.equal(self.pushed[n], t)}
        wanted = {s for n in dirty for s in fused_siblings(n) if s in current}
        return {n: current[n] for n in current if n in wanted}

    def mark_pushed(self, tensors: dict[str, torch.Tensor]) -> None:
        """Record `tensors` as what the engine now holds."""
        self.pushed.update({n: t.clone() for n, t in tensors.items()})
