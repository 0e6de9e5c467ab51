"""Step benchmark (same as `sparselayer bench step`): full-parameter GRPO step vs the layer-sparse step.

Usage: python benchmarks/bench_step.py [--preset default|qwen3-8b] [--steps 2] [--output FILE] ...
"""
import sys

from sparselayer.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "step", *sys.argv[1:]]))
