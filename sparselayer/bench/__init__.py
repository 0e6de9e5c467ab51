"""Benchmark harness, imported only by `sparselayer bench` (never on the training path)."""
