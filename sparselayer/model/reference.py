"""The reference policy of the KL term, two ways: the trained tensors' initial values swapped in for a
no-grad pass (one model in memory, the frozen layers are the reference's already), or a separate
frozen copy of the whole model (what full-parameter trainers keep, and the benchmark's baseline)."""
from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def initial_values(trained: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """A detached copy of the trained tensors as they are now (the reference policy's values)."""
    return {name: p.detach().clone() for name, p in trained.items()}


@contextmanager
def swapped_in(trained: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block the trained parameters hold `values`, afterwards their own tensors again, even on
    error. The storages are exchanged, not copied (no third copy of the trained tensors), and the
    Parameter objects stay the same ones the optimizer and the gradient hooks hold."""
    def exchange() -> None:
        for name, p in trained.items():
            p.data, values[name] = values[name], p.data

    exchange()
    try:
        yield
    finally:
        exchange()


def frozen_copy(model: nn.Module) -> nn.Module:
    """A separate frozen, eval-mode copy of the model."""
    return copy.deepcopy(model).requires_grad_(False).eval()
