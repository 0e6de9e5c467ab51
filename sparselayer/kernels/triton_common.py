"""What the Triton kernel modules share: whether kernels are interpreted, and the operand check.

Imports triton at import time, so only the *_triton modules import it (they are themselves imported
lazily, when the Triton backend is chosen). triton.jit builds interpreted or compiled kernels when a
module defining them is imported: TRITON_INTERPRET=1 must be set before that for CPU tensors.
"""
from __future__ import annotations

import torch
import triton

# Whether this process builds interpreted kernels (CPU tensors) or compiled ones (CUDA tensors).
INTERPRETED = bool(triton.knobs.runtime.interpret)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_operand(dtype: torch.dtype, device: torch.device) -> None:
    """ValueError unless Triton handles `dtype` here and can run on `device` (shared by every Triton kernel)."""
    if dtype not in TRITON_DTYPES:
        raise ValueError(f"the triton backend supports float32, bfloat16 and float16, got {dtype}")
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1, set before the triton "
                         "kernels are first imported, for CPU tensors)")
