"""The trained layer's optimizer: AdamW (or bitsandbytes' 8-bit AdamW), over fp32 master weights when
the model is bf16/fp16.

A bf16 weight keeps 8 bits of mantissa: an update smaller than about 1/256 of the weight rounds back to
the same value and is lost. With master weights the optimizer steps fp32 copies and writes them back
rounded, so small updates accumulate in the copy until they show. Gradients are summed in fp32 too:
after each backward a hook moves the parameter's bf16 gradient onto its master's fp32 `.grad` (and
frees it), so micro-batch gradients never add up in bf16. Clip and read them with `grad_tensors`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .errors import ConfigError

LOW_PRECISION = (torch.bfloat16, torch.float16)


class MasterWeights:
    """Mixin for a torch optimizer class: it steps fp32 copies of low-precision parameters."""

    def __init__(self, params: Iterable[Any], **kwargs: Any):
        groups = _as_groups(params)
        self.model_params = [p for g in groups for p in g["params"]]
        self.masters = [p.detach().float().clone() for p in self.model_params]
        lookup = {id(p): m for p, m in zip(self.model_params, self.masters)}
        self._master_of = lookup
        super().__init__([{**g, "params": [lookup[id(p)] for p in g["params"]]} for g in groups], **kwargs)
        for p in self.model_params:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._fold_grad)

    @torch.no_grad()
    def _fold_grad(self, p: torch.Tensor) -> None:
        """Add the parameter's fresh gradient to its master's fp32 gradient and free the low-precision one."""
        if p.grad is None:
            return
        m = self._master_of[id(p)]
        g = p.grad.float()
        m.grad = g if m.grad is None else m.grad.add_(g)
        p.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        """Fold any gradient set by hand onto the masters, step them, write the masters back."""
        for p in self.model_params:
            self._fold_grad(p)
        loss = super().step(closure)
        for p, m in zip(self.model_params, self.masters):
            p.copy_(m)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the model parameters and of their masters."""
        super().zero_grad(set_to_none)
        for p in self.model_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state plus the fp32 masters (a checkpoint's bf16 weights alone would lose them)."""
        return {**super().state_dict(), "master_weights": [m.detach().clone() for m in self.masters]}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore state and masters (from the model's current weights when the state has none)."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("master_weights", None)
        if saved is not None and len(saved) != len(self.masters):
            raise ConfigError(f"optimizer state holds {len(saved)} master weights, the trained layers have "
                              f"{len(self.masters)}")
        for i, (p, m) in enumerate(zip(self.model_params, self.masters)):
            m.copy_(saved[i] if saved is not None else p.float())
            p.copy_(m)
        super().load_state_dict(state_dict)


def grad_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors whose `.grad` the optimizer steps: the fp32 masters with master weights, else the
    parameters themselves (what gradient clipping and a gradient norm must look at)."""
    return [p for g in optimizer.param_groups for p in g["params"]]


class MasterAdamW(MasterWeights, torch.optim.AdamW):
    """torch AdamW over fp32 master weights."""


def build_optimizer(params: Iterable[Any], optim: str = "adamw", lr: float = 1e-5,
                    weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW or 8-bit AdamW (`optim`, --optim) for the trained parameters (tensors or param-group dicts,
    whose own "lr" overrides `lr`); fp32 master weights whenever a trained parameter is bf16/fp16."""
    groups = _as_groups(params)
    low = any(p.dtype in LOW_PRECISION for g in groups for p in g["params"])
    kwargs = {"lr": lr, "weight_decay": weight_decay}
    if optim == "adamw":
        return (MasterAdamW if low else torch.optim.AdamW)(groups, **kwargs)
    if optim == "adamw8bit":
        base = _adamw8bit_class()
        cls = type("MasterAdamW8bit", (MasterWeights, base), {}) if low else base
        return cls(groups, **kwargs)
    raise ConfigError(f"--optim must be adamw or adamw8bit, got {optim!r}")


def _adamw8bit_class() -> type:
    """bitsandbytes' AdamW8bit (blockwise 8-bit moments; runs on CPU too: tested)."""
    from .model.quant import import_bitsandbytes

    return import_bitsandbytes().optim.AdamW8bit


def _as_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    """Parameters or parameter-group dicts as a list of group dicts (each with a list of params)."""
    items = list(params)
    if items and isinstance(items[0], dict):
        return [{**g, "params": list(g["params"])} for g in items]
    return [{"params": items}]


def lr_factor(kind: str, step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate multiplier before optimizer step `step` (0-based): a linear warm-up reaching 1 at step
    warmup_steps - 1, then constant, or (`kind` linear / cosine) decaying to 0 at `total_steps` as transformers'
    linear and cosine schedules do after their warm-up (--lr-scheduler-type)."""
    if warmup_steps and step < warmup_steps:
        return min(1.0, (step + 1) / warmup_steps)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ConfigError(f"--lr-scheduler-type must be constant, linear or cosine, got {kind!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of `lr_factor` over `total_steps` optimizer steps (stepped once per step)."""
    lr_factor(kind, 0, warmup_steps, total_steps)  # an unknown kind fails here, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(kind, s, warmup_steps, total_steps))
