"""Peak memory accounting that works on CPU (peak resident set) and CUDA (allocator peak).

CUDA: `torch.cuda.max_memory_allocated`, reset per window. CPU on Linux: the kernel's resident-set
high-water mark (VmHWM), which writing "5" to /proc/self/clear_refs resets to the current resident
set, so a window's peak is what the process held at its worst during that window (resident memory
from before the window, model and optimizer included, counts). Elsewhere: the lifetime peak.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


def reset_peak(device: torch.device) -> bool:
    """Start a new peak window; False where only the process's lifetime peak is available."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        CLEAR_REFS.write_text("5")  # Linux >= 4.0: reset VmHWM
    except OSError:
        return False
    return _vm_hwm() is not None


def peak_bytes(device: torch.device) -> int:
    """Peak bytes of the current window: allocator peak on CUDA, resident-set peak on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    hwm = _vm_hwm()
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _vm_hwm() -> int | None:
    """VmHWM from /proc/self/status in bytes, or None off Linux."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
