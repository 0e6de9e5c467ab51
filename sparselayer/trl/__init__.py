"""TRL's front door: `from sparselayer.trl import GRPOTrainer` in place of `from trl import GRPOTrainer`, plus
`layers=`, trains only those layers with sparselayer's engine (docs/trl.md).

TRL stays optional: this package imports it only where a GRPOConfig is made (`GRPOConfig` here is TRL's,
loaded on first use). A sparselayer input error (ConfigError, DataError, ...) that nothing catches prints its one
line, `sparselayer: error: ...`, instead of a traceback, so a TRL script given a setting sparselayer cannot honour
stops with that line and a non-zero exit status.
"""
from __future__ import annotations

import sys
from typing import Any

from ..errors import SparseLayerError
from .fields import FIELDS
from .grpo_trainer import GRPOTrainer, trl_module


def __getattr__(name: str) -> Any:
    if name == "GRPOConfig":
        return trl_module().GRPOConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _one_line_errors(previous: Any) -> Any:
    """An excepthook printing an uncaught SparseLayerError as one line; anything else goes to `previous`."""
    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(kind, SparseLayerError):
            sys.stderr.write(f"sparselayer: error: {value}\n")
        else:
            previous(kind, value, tb)

    hook.sparselayer_one_line = True  # type: ignore[attr-defined]
    return hook


if not getattr(sys.excepthook, "sparselayer_one_line", False):
    sys.excepthook = _one_line_errors(sys.excepthook)

__all__ = ["FIELDS", "GRPOConfig", "GRPOTrainer"]
