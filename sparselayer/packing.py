"""Balanced micro-batch packing: split sequences into micro-batches with even token sums.

Each GRPO micro-batch costs roughly its token count, so balancing the sums keeps the
slowest micro-batch (and padding) small. The work is done by the C++ extension
``sparselayer._C`` when it is built; ``pack_balanced_py`` is the bit-identical pure-Python
fallback, so the package works without a compiler.
"""

from __future__ import annotations

import heapq
import importlib
import operator
from collections.abc import Sequence

try:  # by module name: the extension is not a Python file, and `from sparselayer import _C` would read
    # to the layer contracts as an import of the whole package
    _C = importlib.import_module("sparselayer._C")
except ImportError:  # extension not built (or hidden): use the Python twin
    _C = None

HAVE_EXTENSION: bool = _C is not None

__all__ = ["HAVE_EXTENSION", "pack_balanced", "pack_balanced_py", "pack_groups"]


def _validate(lengths: Sequence[int], max_per_batch: int) -> tuple[list[int], int]:
    """Coerce to plain ints and raise ValueError on the inputs both implementations reject."""
    lengths = [operator.index(x) for x in lengths]
    max_per_batch = operator.index(max_per_batch)
    if max_per_batch < 1:
        raise ValueError("max_per_batch must be >= 1")
    if any(x < 0 for x in lengths):
        raise ValueError("lengths must be >= 0")
    return lengths, max_per_batch


def pack_balanced_py(lengths: Sequence[int], max_per_batch: int) -> list[list[int]]:
    """Pure-Python LPT packing: longest first into the lightest non-full micro-batch.

    Makes ``ceil(n / max_per_batch)`` micro-batches of at most ``max_per_batch`` indices,
    ties going to the lowest micro-batch number; returns each micro-batch sorted, the
    micro-batches ordered by their first index. Same results as ``sparselayer._C``.
    """
    lengths, max_per_batch = _validate(lengths, max_per_batch)
    n = len(lengths)
    m = -(-n // max_per_batch)  # ceil; 0 when n == 0
    order = sorted(range(n), key=lambda i: -lengths[i])  # stable: ties by index ascending
    open_slots = [(0, b) for b in range(m)]  # heap of (token sum, micro-batch number)
    batches: list[list[int]] = [[] for _ in range(m)]
    for idx in order:
        total, b = heapq.heappop(open_slots)
        batches[b].append(idx)
        if len(batches[b]) < max_per_batch:
            heapq.heappush(open_slots, (total + lengths[idx], b))
    # No micro-batch ends empty: an empty one has the minimal sum 0 and would be picked
    # before the other m - 1, which hold fewer than n indices in total.
    for batch in batches:
        batch.sort()
    batches.sort(key=lambda batch: batch[0])
    return batches


def pack_balanced(lengths: Sequence[int], max_per_batch: int) -> list[list[int]]:
    """Pack sequence indices into balanced micro-batches (C++ when built, else Python)."""
    if _C is None:
        return pack_balanced_py(lengths, max_per_batch)
    lengths, max_per_batch = _validate(lengths, max_per_batch)
    return _C.pack_balanced(lengths, max_per_batch)


def pack_groups(lengths: Sequence[int], group_size: int, max_per_batch: int) -> list[list[int]]:
    """Micro-batches that keep GRPO groups (rows g*group_size .. +group_size-1) together, so a group's
    rows can share their prompt's computation.

    With max_per_batch >= group_size, whole groups are balanced by token sum (``pack_balanced`` over
    groups, max_per_batch // group_size groups each); with fewer, each group is cut into chunks of
    max_per_batch rows of similar length. Falls back to ``pack_balanced`` for group_size 1 or when the
    rows are not whole groups. Each micro-batch sorted, micro-batches ordered by their first index.
    """
    lengths, max_per_batch = _validate(lengths, max_per_batch)
    n = len(lengths)
    if group_size <= 1 or n % group_size:
        return pack_balanced(lengths, max_per_batch)
    groups = [list(range(g, g + group_size)) for g in range(0, n, group_size)]
    if max_per_batch >= group_size:
        units = pack_balanced([sum(lengths[i] for i in g) for g in groups], max_per_batch // group_size)
        batches = [sorted(i for u in unit for i in groups[u]) for unit in units]
    else:
        batches = []
        for g in groups:
            by_length = sorted(g, key=lambda i: -lengths[i])
            batches += [sorted(by_length[c : c + max_per_batch]) for c in range(0, group_size, max_per_batch)]
    batches.sort(key=lambda batch: batch[0])
    return batches
