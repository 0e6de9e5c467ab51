"""Quantized frozen layers on this machine: completion log-prob drift and forward time against the dense model.

Usage: python benchmarks/bench_quant.py [--model DIR | --random-model] [--layer 16] [--dtype float32|bfloat16]
                                       [--prompts 16] [--generations 8] [--repeats 5] [--output FILE]

Log-prob drift: completions sampled from the dense model on the model's task (the embedded default
model and arithmetic when --model is not given), scored by the dense model and by the model whose
frozen layers run through bitsandbytes (nf4, int8); mean and max |delta log p| over completion tokens.
Time: one no-grad forward of the whole rollout batch (median of --repeats, the variants interleaved so
load from other processes hits them alike), dense vs quantized. --random-model builds the step
benchmark's random model (24 layers, hidden 512, MLP 1536, vocabulary 32768), where matmuls dominate.
Also: one Linear of that model's MLP shape alone (2048 rows), dense fp32/bf16 against nf4/int8.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparselayer.bench import StepBenchConfig, build_random_model
from sparselayer.config import TrainConfig
from sparselayer.trainer import Trainer


def trainer_for(args: argparse.Namespace, quant: str) -> Trainer:
    """A trainer (model, task, sampler) with the frozen layers quantized as asked."""
    values = {"layers": str(args.layer), "quant": quant, "prefix_cache": False, "seed": 0, "rollout": "hf",
              "prompts_per_step": args.prompts, "num_generations": args.generations, "dtype": args.dtype}
    if args.model:
        values["model"] = args.model
    return Trainer(TrainConfig.from_mapping(values))


def linear_times(rows: int = 2048, fan_in: int = 512, fan_out: int = 1536, repeats: int = 7) -> dict[str, float]:
    """Median ms of one no-grad Linear (rows x fan_in by fan_in x fan_out): dense fp32/bf16 vs nf4/int8."""
    from torch import nn

    from sparselayer.model.quant import quantized_linear

    torch.manual_seed(0)
    dense = nn.Linear(fan_in, fan_out, bias=False)
    x = torch.randn(rows, fan_in)
    variants = {"dense_fp32": (dense, x),
                "dense_bf16": (nn.Linear(fan_in, fan_out, bias=False).bfloat16(), x.bfloat16()),
                "nf4_bf16_in": (quantized_linear(dense, "nf4"), x.bfloat16()),
                "int8_bf16_in": (quantized_linear(dense, "int8"), x.bfloat16())}
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for _ in range(repeats):
            for name, (module, inp) in variants.items():
                t0 = time.perf_counter()
                module(inp)
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(v) for name, v in times.items()}


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--random-model", action="store_true", help="the step benchmark's random model shape")
    parser.add_argument("--layer", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (dense model and nf4/int8 alike)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sparselayer-quant-") as tmp:
        if args.random_model:
            args.model = str(build_random_model(StepBenchConfig(), Path(tmp) / "model"))
        trainers = {mode: trainer_for(args, mode) for mode in ("none", "nf4", "int8")}
        sb = trainers["none"].rollout_batch()
        times = {mode: [] for mode in trainers}
        logps = {}
        for _ in range(args.repeats):
            for mode, trainer in trainers.items():
                t0 = time.perf_counter()
                logps[mode] = trainer._logprobs_no_grad(sb)
                times[mode].append(time.perf_counter() - t0)
    mask = sb.batch.completion_mask.bool()
    dense_s = statistics.median(times["none"])
    result = {"model": "random (step benchmark shape)" if args.random_model else args.model or "embedded default",
              "layer": args.layer, "dtype": args.dtype, "rows": int(mask.shape[0]),
              "completion_tokens": int(mask.sum()),
              "threads": torch.get_num_threads(), "dense_forward_s": dense_s, "modes": {}}
    for mode in ("nf4", "int8"):
        diff = (logps[mode] - logps["none"]).abs()[mask]
        seconds = statistics.median(times[mode])
        result["modes"][mode] = {"mean_abs_dlogp": float(diff.mean()), "max_abs_dlogp": float(diff.max()),
                                 "forward_s": seconds, "slowdown_vs_dense": seconds / dense_s}
    result["linear_2048x512x1536_ms"] = linear_times()
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
