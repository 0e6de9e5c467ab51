"""User-facing errors: the CLI prints one line for these and exits non-zero, never a traceback."""
from __future__ import annotations

from typing import Any


def first_line(text: Any) -> str:
    """First non-empty line of a message (stripped; "" when there is none), so errors stay one line."""
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


class SparseLayerError(Exception):
    """Base of every error caused by the user's input (flags, files, models, reward code)."""

    exit_code = 2


class ConfigError(SparseLayerError):
    """A flag, YAML key or combination of settings is invalid."""


class ModelError(SparseLayerError):
    """A model folder is missing, not a causal LM, or of an unsupported architecture."""


class DataError(SparseLayerError):
    """A data file is missing, empty or malformed."""


class RewardError(SparseLayerError):
    """A user reward function could not be loaded, raised, or returned bad values."""


class RunError(SparseLayerError):
    """A run directory cannot be used (nothing to resume, checkpoint unreadable, ...)."""


class DeltaError(SparseLayerError):
    """A layer-delta payload is malformed or does not match the served model (refused, nothing applied)."""


class RemoteError(SparseLayerError):
    """A rollout server cannot be reached or refused a request."""


class SyncError(SparseLayerError):
    """After a weight push, the rollout engine's log-probs disagree with the trainer's (--check-sync)."""
