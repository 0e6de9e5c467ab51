"""Layer selections from the paper: the k middle layers, or the top-k layers of an earlier sweep.

`mid:5` needs only the depth; `top:3` reads the ranking from a `sweep.csv` written by `sparselayer sweep`.
"""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path

from ..errors import ConfigError

SELECTION = re.compile(r"(mid|top):(\d+)")


def is_selection(spec: str) -> bool:
    """True for `mid:k` / `top:k` specs (resolved here rather than parsed as a layer list)."""
    return SELECTION.fullmatch(str(spec).strip().lower()) is not None


def middle_layers(k: int, num_layers: int) -> list[int]:
    """The k consecutive layers centred on the middle of the stack (lower middle when it cannot be exact)."""
    _check_count(k, num_layers, "mid")
    start = (num_layers - k) // 2
    return list(range(start, start + k))


def read_contributions(csv_path: str | Path) -> dict[int, float]:
    """Mean contribution C(k) per layer of a sweep CSV (layers without a finite value are dropped)."""
    path = Path(csv_path)
    if not path.is_file():
        raise ConfigError(f"sweep CSV not found: {path}")
    try:
        with path.open(newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("kind") == "layer"]
        values = {int(r["layer"]): float(r["contribution_mean"]) for r in rows}
    except (KeyError, ValueError, csv.Error):
        raise ConfigError(f"{path} is not a sweep CSV written by `sparselayer sweep`") from None
    return {k: c for k, c in values.items() if math.isfinite(c)}


def read_ranking(csv_path: str | Path) -> list[int]:
    """Layer indices of a sweep CSV, best contribution first."""
    scored = read_contributions(csv_path)
    if not scored:
        raise ConfigError(f"{csv_path} holds no layer with a finite contribution C(k)")
    return sorted(scored, key=lambda k: (-scored[k], k))


def top_layers(k: int, num_layers: int, csv_path: str | Path | None) -> list[int]:
    """The k best layers of an earlier sweep (by mean contribution C(k))."""
    if not csv_path:
        raise ConfigError(f"top:{k} ranks layers by an earlier sweep: give --from sweep.csv")
    ranking = read_ranking(csv_path)
    if any(layer >= num_layers for layer in ranking):
        raise ConfigError(f"{csv_path} ranks layers of a deeper model than this one ({num_layers} layers)")
    _check_count(k, len(ranking), "top", f" ({csv_path} ranks {len(ranking)} layers)")
    return sorted(ranking[:k])


def select_layers(spec: str, num_layers: int, ranking_csv: str | Path | None = None) -> list[int]:
    """Resolve `mid:k` or `top:k` to sorted layer indices."""
    match = SELECTION.fullmatch(str(spec).strip().lower())
    if match is None:
        raise ConfigError(f"{spec!r} is not a layer selection (mid:k or top:k)")
    kind, k = match[1], int(match[2])
    return middle_layers(k, num_layers) if kind == "mid" else top_layers(k, num_layers, ranking_csv)


def _check_count(k: int, available: int, kind: str, where: str = "") -> None:
    if not 1 <= k <= available:
        raise ConfigError(f"{kind}:{k} asks for {k} layers, but 1..{available} are available{where}")
