"""Compatibility alias: the layer-delta codec lives in `sparselayer.sync.delta` (every public name re-exported)."""
from ..sync.delta import *  # noqa: F403
