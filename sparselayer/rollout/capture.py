"""Capturing, while an engine samples, the residual stream entering the lowest trained layer.

To pick the next token an engine runs every layer over every prompt and completion token, so it computes
the exact tensor the trainer's frozen-prefix pass would compute again. An engine told to capture
(`RolloutEngine.set_capture`) returns it with each rollout (`sparselayer.batch.CapturedStates`), in the
trainer's dtype, on the trainer's device up to the prefix-cache budget (the rest in CPU memory).

`resolve_prefix_source` decides --prefix-source: rollout where the engine can capture (ConfigError
where asked for and it cannot), trainer where it cannot; auto takes the rollout's states only where their
numerics are the trainer's (`CaptureSupport.mismatch`). Engine-specific capture lives with each engine
(`hf`: a hook during generate; `vllm_capture`: a hook inside vLLM's worker).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError

HOST = torch.device("cpu")


@dataclass(frozen=True)
class CaptureSpec:
    """What the trainer asks an engine to capture: the input of decoder layer `layer`, in `dtype`, on
    `device` until `budget_bytes` are used (None: no limit), the rest in CPU memory."""

    layer: int
    dtype: torch.dtype
    device: torch.device
    budget_bytes: int | None = None


@dataclass(frozen=True)
class CaptureSupport:
    """Whether an engine can capture: `unavailable` says why it cannot at all (--prefix-source rollout is
    then a ConfigError), `mismatch` why its states differ from the trainer's own (auto then keeps the
    trainer's prefix pass)."""

    unavailable: str | None = None
    mismatch: str | None = None


def resolve_prefix_source(choice: str, engine, start: int | None, dtype: torch.dtype, device: torch.device,
                          quant: str = "none", budget_bytes: int | None = None) -> str:
    """'rollout' or 'trainer' for --prefix-source `choice`, telling `engine` to capture when it is rollout.

    `start`: the lowest trained layer where the trainer caches its frozen prefix, None where it runs full
    forwards (--layers all, --no-prefix-cache): then there is no prefix to take from the rollout. `dtype`,
    `quant`: the trainer's (its frozen layers' quantization, which an engine may not share).
    """
    if choice == "trainer":
        return "trainer"
    if start is None:
        problem = "the trainer runs full forwards (--layers all or --no-prefix-cache): no frozen prefix to skip"
        support = CaptureSupport(unavailable=problem)
    else:
        probe = getattr(engine, "capture_support", None)
        support = probe(dtype, quant) if probe else CaptureSupport(unavailable="the rollout engine does not capture")
    if support.unavailable and choice == "rollout":
        raise ConfigError(f"--prefix-source rollout: {support.unavailable}; use --prefix-source trainer")
    if support.unavailable or (choice == "auto" and support.mismatch):
        return "trainer"
    engine.set_capture(CaptureSpec(start, dtype, device, budget_bytes))
    return "rollout"


class StatePlacer:
    """Puts captured tensors, in order, on the trainer's device until the budget is used, the rest in CPU
    memory, in the trainer's dtype."""

    def __init__(self, spec: CaptureSpec):
        self.spec, self.used = spec, 0

    def place(self, t: torch.Tensor) -> torch.Tensor:
        """A compact copy of `t` (not a view into a larger forward's tensor) in the trainer's dtype, on its
        device while the budget lasts (else CPU memory)."""
        size = t.numel() * torch.finfo(self.spec.dtype).bits // 8
        budget = self.spec.budget_bytes
        device = self.spec.device if budget is None or self.used + size <= budget else HOST
        if device == self.spec.device:
            self.used += size
        return t.to(device=device, dtype=self.spec.dtype, copy=True)


@contextmanager
def layer_inputs(layer: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The hidden states entering `layer` in each of its forwards (a transformers decoder layer, whose
    input is the residual stream), collected while the block runs."""
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((args[0] if args else kwargs["hidden_states"]).detach())

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()
