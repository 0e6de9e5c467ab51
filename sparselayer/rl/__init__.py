"""Compatibility alias: the GRPO math lives in `sparselayer.objective`."""
