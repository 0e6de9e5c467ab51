"""Where a run's metrics also go (--report-to): TensorBoard, Weights & Biases, Trackio.

Each reporter uses its library's own API and receives the same keys as metrics.jsonl (numbers only),
plus tables of sample completions (--log-completions). The libraries are optional extras
(`pip install -e '.[report]'`); asking for one that is not installed is a one-line ConfigError before
the run starts.
"""
from __future__ import annotations

import importlib.util
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError

PROJECT = "sparselayer"  # the wandb / trackio project (WANDB_PROJECT overrides it for wandb)
INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}  # reporter -> module to import


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics line (bools as 0/1; NaN kept: loggers show it as a gap)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Real)}


class Reporter(ABC):
    """One logging backend."""

    @abstractmethod
    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record numeric metrics at `step`."""

    @abstractmethod
    def log_table(self, name: str, rows: Sequence[dict[str, Any]], step: int) -> None:
        """Record a table (rows of equal keys) at `step`."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Flush and release the backend."""


class TensorBoardReporter(Reporter):
    """Event files under <run>/tensorboard, written with torch's SummaryWriter (TensorBoard's format)."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", _markdown_table([_flat(config)]), 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_table(self, name: str, rows: Sequence[dict[str, Any]], step: int) -> None:
        self.writer.add_text(name, _markdown_table(rows), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter(Reporter):
    """A Weights & Biases run in <run>/wandb (WANDB_MODE=offline works without an account)."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=PROJECT, name=run_dir.name, dir=str(run_dir), config=config, reinit="create_new")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, name: str, rows: Sequence[dict[str, Any]], step: int) -> None:
        self.run.log({name: self.wandb.Table(**_columns_and_data(rows))}, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioReporter(Reporter):
    """A Trackio run (local by default: TRACKIO_DIR, or a Space with TRACKIO_SPACE_ID)."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=PROJECT, name=run_dir.name, config=config, resume="allow")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(metrics, step=step)

    def log_table(self, name: str, rows: Sequence[dict[str, Any]], step: int) -> None:
        self.trackio.log({name: self.trackio.Table(**_columns_and_data(rows))}, step=step)

    def close(self) -> None:
        self.trackio.finish()


REPORTERS: dict[str, type[Reporter]] = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter,
                                        "trackio": TrackioReporter}


class Reporters:
    """Every reporter of --report-to, fed together."""

    def __init__(self, reporters: Sequence[Reporter] = ()):
        self.reporters = list(reporters)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Send the numeric entries of a metrics line to every reporter."""
        values = scalars(metrics)
        for r in self.reporters:
            r.log(values, step)

    def log_table(self, name: str, rows: Sequence[dict[str, Any]], step: int) -> None:
        for r in self.reporters:
            r.log_table(name, rows, step)

    def close(self) -> None:
        for r in self.reporters:
            r.close()


def check_reporters(names: Sequence[str] | None) -> list[str]:
    """The reporters asked for (none dropped), each installed; ConfigError naming the extra otherwise."""
    chosen = [n for n in dict.fromkeys(names or ()) if n != "none"]
    for name in chosen:
        if name not in REPORTERS:
            raise ConfigError(f"--report-to must be one of none, {', '.join(REPORTERS)}, got {name!r}")
        if importlib.util.find_spec(INSTALL[name]) is None:
            raise ConfigError(f"--report-to {name} needs the {INSTALL[name]} package: "
                              f"pip install {INSTALL[name]} (or the [report] extra)")
    return chosen


def build_reporters(names: Sequence[str] | None, run_dir: str | Path, config: dict[str, Any]) -> Reporters:
    """Start every reporter of --report-to for the run in `run_dir`, with the run's config."""
    return Reporters([REPORTERS[n](Path(run_dir), config) for n in check_reporters(names)])


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """Sectioned settings as one level (model.layers -> layers): the keys users know."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        out.update(_flat(value) if isinstance(value, dict) else {key: value})
    return out


def _columns_and_data(rows: Sequence[dict[str, Any]]) -> dict[str, list]:
    """Rows of equal keys as a table's columns and cell lists (wandb's and Trackio's Table arguments)."""
    columns = list(rows[0]) if rows else []
    return {"columns": columns, "data": [[_cell(r.get(c)) for c in columns] for r in rows]}


def _cell(value: Any) -> Any:
    """A table cell: numbers and text as they are, anything else as text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value if isinstance(value, (int, float, str)) or value is None else str(value)


def _markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows as a Markdown table (TensorBoard's text plugin renders it)."""
    if not rows:
        return "(no rows)"
    columns = list(rows[0])
    escape = lambda v: str(_cell(v)).replace("|", "\\|").replace("\n", "<br>")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(escape(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
