"""Byte sizes written by people ("512MiB", "2GiB", "1.5GB", "1e9") parsed into an int of bytes."""
from __future__ import annotations

import math
import re

from .errors import ConfigError

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30, "t": 2**40, "tib": 2**40}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*")


def parse_size(text: str | int | float, flag: str = "--prefix-cache-budget") -> int:
    """Bytes in `text`: a number of bytes or a number with a unit (KB/MB/GB/TB decimal, KiB/MiB/GiB/TiB binary)."""
    match = _SIZE.fullmatch(str(text).lower())
    if not match or match[2] not in UNITS:
        raise ConfigError(f"{flag} must be a size such as 512MiB, 2GiB, 1.5GB or 1e9 (bytes), got {text!r}")
    value = float(match[1]) * UNITS[match[2]]
    if not math.isfinite(value):
        raise ConfigError(f"{flag} must be a finite size, got {text!r}")
    return int(value)
