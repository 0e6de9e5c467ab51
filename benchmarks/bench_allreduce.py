"""Bytes a data-parallel step all-reduces: sparselayer (the trained layer's gradients) vs full-parameter DDP.

For both model shapes of the step benchmark (`sparselayer bench step`: the default 109M-parameter
Qwen3-shaped model, layer 12; the qwen3-8b preset, layer 16) the parameters are counted on PyTorch's
meta device (nothing is allocated), and the per-step bytes follow from the counts:

- sparselayer all-reduces the trained layer's gradients once per optimization pass, in one flat fp32
  bucket (on the fp32 master weights when the model is bf16): 4 bytes per trained parameter;
- full-parameter DDP all-reduces every parameter's gradient once per optimization pass, in the
  gradients' dtype: 4 bytes per parameter in float32, 2 in bfloat16 (DDP's usual bf16 run).

Both move their bytes num_iterations times per step (the step benchmark's default is 2 passes). With
--measure, two gloo processes on this machine also time one all-reduce of each bucket of the default
shape (a ring all-reduce sends about 2 (N-1)/N of the bucket per rank; this shows the ratio, not a network).

    python benchmarks/bench_allreduce.py              # writes benchmarks/results/allreduce.json
    python benchmarks/bench_allreduce.py --measure
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparselayer.bench.config import PRESETS, StepBenchConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "allreduce.json"


def param_counts(cfg: StepBenchConfig) -> tuple[int, int]:
    """(all parameters, parameters of decoder layer cfg.layer) of the step benchmark's model, on the meta device."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.kv_heads, head_dim=cfg.hidden // cfg.heads,
                         tie_word_embeddings=False)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[cfg.layer].parameters())
    return total, layer


def row(preset: str) -> dict:
    """Per-step all-reduce bytes of one preset's shape."""
    cfg = StepBenchConfig(**{k: v for k, v in PRESETS[preset].items() if k != "variants"})
    total, layer = param_counts(cfg)
    passes = cfg.num_iterations
    return {"preset": preset, "layer": cfg.layer, "params": total, "trained_params": layer,
            "num_iterations": passes,
            "sparselayer_bytes_per_step": 4 * layer * passes,
            "ddp_fp32_bytes_per_step": 4 * total * passes,
            "ddp_bf16_bytes_per_step": 2 * total * passes,
            "ratio_vs_ddp_fp32": layer / total,
            "ratio_vs_ddp_bf16": 2 * layer / total}


def _time_allreduce(rank: int, sizes: list[int], port: str, out: str) -> None:
    """One gloo rank: a warm-up and three timed all-reduces of each bucket size (float32 elements)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    times = []
    for n in sizes:
        bucket = torch.ones(n)
        dist.all_reduce(bucket)
        t0 = time.perf_counter()
        for _ in range(3):
            dist.all_reduce(bucket)
        times.append((time.perf_counter() - t0) / 3)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def measure(layer: int, total: int) -> dict:
    """Seconds for one 2-rank gloo all-reduce of the trained layer's bucket and of the whole model's."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        mp.spawn(_time_allreduce, args=([layer, total], "29517", f.name), nprocs=2)
        sparse_s, full_s = json.loads(Path(f.name).read_text())
    return {"gloo_2_ranks_sparselayer_s": sparse_s, "gloo_2_ranks_ddp_fp32_s": full_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="also time both buckets of the default shape (gloo)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = [row(p) for p in ("default", "qwen3-8b")]
    if args.measure:
        rows[0].update(measure(rows[0]["trained_params"], rows[0]["params"]))
    print(f"{'shape':<10}{'params':>15}{'trained':>12}{'sparselayer/step':>18}{'DDP fp32/step':>16}"
          f"{'DDP bf16/step':>16}{'vs fp32':>9}{'vs bf16':>9}")
    for r in rows:
        print(f"{r['preset']:<10}{r['params']:>15,}{r['trained_params']:>12,}"
              f"{r['sparselayer_bytes_per_step'] / 2**20:>15.1f}MiB{r['ddp_fp32_bytes_per_step'] / 2**20:>13.1f}MiB"
              f"{r['ddp_bf16_bytes_per_step'] / 2**20:>13.1f}MiB"
              f"{r['ratio_vs_ddp_fp32']:>9.2%}{r['ratio_vs_ddp_bf16']:>9.2%}")
    if args.measure:
        r = rows[0]
        print(f"one all-reduce, 2 gloo ranks on this machine: sparselayer {r['gloo_2_ranks_sparselayer_s']:.3f}s, "
              f"full-parameter {r['gloo_2_ranks_ddp_fp32_s']:.3f}s")
    result = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
