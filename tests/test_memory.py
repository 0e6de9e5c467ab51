"""Peak memory windows on CPU: a window's peak sees what was allocated in it, and a new window
forgets a peak from before it (Linux VmHWM reset)."""
from __future__ import annotations

import sys

import pytest
import torch

from sparselayer.memory import peak_bytes, reset_peak

CPU = torch.device("cpu")
SIZE = 256 * 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")
def test_cpu_peak_window_sees_its_own_allocations_only():
    assert reset_peak(CPU)
    base = peak_bytes(CPU)
    big = torch.ones(SIZE // 4)  # touched pages: resident
    with_big = peak_bytes(CPU)
    assert with_big >= base + 0.9 * SIZE
    del big
    assert peak_bytes(CPU) == pytest.approx(with_big, rel=0.01)  # a peak stays until the window ends
    assert reset_peak(CPU)
    assert peak_bytes(CPU) < with_big - 0.5 * SIZE  # freed (large allocations go back to the system)
