"""The sweep results file (`sweep.csv`): its columns, how rows are written, and how a ranking is read back.

`sparselayer sweep` writes one row for the base model, one for full-parameter training and one per
trained layer; `--layers top:k --from sweep.csv` and `sparselayer sweep compare` read the layer rows'
contribution C(k). Both sides go through this module, so the format lives in one place. Low level on
purpose (errors and stdlib only at import), so reading a ranking never pulls in torch.
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError

KIND, LAYER, CONTRIBUTION = "kind", "layer", "contribution_mean"
LAYER_KIND = "layer"  # the `kind` of a row for one layer trained alone ("base" and "full" are the others)
CSV_FIELDS = [KIND, LAYER, "depth", "runs", "score_mean", "score_std", CONTRIBUTION, "contribution_std", "rank"]


def csv_text(rows: Iterable[Mapping[str, Any]]) -> str:
    """The CSV text of the sweep's rows (None written as an empty cell); the caller writes it atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_FIELDS})
    return buffer.getvalue()


def read_contributions(path: str | Path) -> dict[int, float]:
    """Mean contribution C(k) per layer of a sweep CSV (layers without a finite value are dropped)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep CSV not found: {path}")
    try:
        with path.open(newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get(KIND) == LAYER_KIND]
        values = {int(r[LAYER]): float(r[CONTRIBUTION]) for r in rows}
    except (KeyError, ValueError, csv.Error):
        raise ConfigError(f"{path} is not a sweep CSV written by `sparselayer sweep`") from None
    return {k: c for k, c in values.items() if math.isfinite(c)}


def read_ranking(path: str | Path) -> list[int]:
    """Layer indices of a sweep CSV, best contribution first (ties: lower index first)."""
    scored = read_contributions(path)
    if not scored:
        raise ConfigError(f"{path} holds no layer with a finite contribution C(k)")
    return sorted(scored, key=lambda k: (-scored[k], k))


def resolve_layers(spec: str, num_layers: int, ranking_csv: str | Path | None) -> list[int] | None:
    """`parse_layers(spec, ...)`, reading the ranking from `ranking_csv` only when the spec needs one (top:k),
    so a --from given with another spec is not opened. None means "all"."""
    from .model.layer_select import needs_ranking  # imported here: this module stays torch-free
    from .model.layout import parse_layers

    ranking = read_ranking(ranking_csv) if ranking_csv and needs_ranking(spec) else None
    return parse_layers(spec, num_layers, ranking)
