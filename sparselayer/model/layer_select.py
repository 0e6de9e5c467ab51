"""Layer selections from the paper: the k middle layers, or the top-k layers of an earlier sweep.

`mid:5` needs only the depth; `top:3` needs a ranking of the layers, best first (read from a
`sweep.csv` written by `sparselayer sweep`: see `sparselayer.contributions`). No file is read here.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import ConfigError

SELECTION = re.compile(r"(mid|top):(\d+)")


def is_selection(spec: str) -> bool:
    """True for `mid:k` / `top:k` specs (resolved here rather than parsed as a layer list)."""
    return SELECTION.fullmatch(str(spec).strip().lower()) is not None


def needs_ranking(spec: str) -> bool:
    """True for `top:k`: the only spec that needs an earlier sweep's ranking (so callers read it only then)."""
    match = SELECTION.fullmatch(str(spec).strip().lower())
    return match is not None and match[1] == "top"


def middle_layers(k: int, num_layers: int) -> list[int]:
    """The k consecutive layers centred on the middle of the stack (lower middle when it cannot be exact)."""
    _check_count(k, num_layers, "mid")
    start = (num_layers - k) // 2
    return list(range(start, start + k))


def top_layers(k: int, num_layers: int, ranking: Sequence[int] | None) -> list[int]:
    """The k best layers of an earlier sweep's ranking (best first), sorted by index."""
    if ranking is None:
        raise ConfigError(f"top:{k} ranks layers by an earlier sweep: give --from sweep.csv")
    ranking = list(ranking)
    if any(layer >= num_layers for layer in ranking):
        raise ConfigError(f"the --from sweep ranks layers of a deeper model than this one ({num_layers} layers)")
    _check_count(k, len(ranking), "top", f" (the --from sweep ranks {len(ranking)} layers)")
    return sorted(ranking[:k])


def select_layers(spec: str, num_layers: int, ranking: Sequence[int] | None = None) -> list[int]:
    """Resolve `mid:k` or `top:k` (by `ranking`, layer indices best first) to sorted layer indices."""
    match = SELECTION.fullmatch(str(spec).strip().lower())
    if match is None:
        raise ConfigError(f"{spec!r} is not a layer selection (mid:k or top:k)")
    kind, k = match[1], int(match[2])
    return middle_layers(k, num_layers) if kind == "mid" else top_layers(k, num_layers, ranking)


def _check_count(k: int, available: int, kind: str, where: str = "") -> None:
    """Refuse a selection of fewer than 1 or more than `available` layers."""
    if not 1 <= k <= available:
        raise ConfigError(f"{kind}:{k} asks for {k} layers, but 1..{available} are available{where}")
