"""Memory and time of the trained layer + frozen suffix forward/backward, with and without the fused kernels.

The shape is the step benchmark's suffix (`sparselayer bench step` defaults): a random Qwen3 stack of
hidden 512, intermediate 1536, 8 heads (4 KV), whose first layer is trained and whose other layers are
frozen, then the final norm; input: one micro-batch of 8 sequences x 256 tokens, as the cached prefix
hands it over (no grad). Loss: sum(output * fixed random tensor). Variants, each in a fresh process:

  hf            unpatched transformers modules
  fused-swiglu  use_fused_kernels(..., suffix_mlp="swiglu"): fused norms, frozen MLPs keep gate and up
  fused         use_fused_kernels(...) default: fused norms, frozen MLPs keep only their input

Reported: saved  bytes autograd keeps for the backward (distinct storages, parameters excluded),
          alloc  peak live bytes of torch's CPU allocator over forward + backward (profiler),
          rss    peak resident set size over the first forward + backward minus the size before,
          time   median wall time of --reps warm forward + backward runs.

    python benchmarks/bench_norm_mlp.py                       # 12 suffix layers, CPU, float32
    python benchmarks/bench_norm_mlp.py --layers 4 --reps 2   # quicker
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grpo_loss import RssPeak, allocator_peak_cpu, run_worker  # noqa: E402

DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "norm_mlp.json"
VARIANTS = ("hf", "fused-swiglu", "fused")
MiB = 2**20


def build_stack(layers: int, hidden: int, intermediate: int, dtype: torch.dtype) -> torch.nn.Module:
    """A random Qwen3 model whose layer 0 is trained and every other parameter frozen."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=64, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8,
                         max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    model = Qwen3ForCausalLM(config).to(dtype).train()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.layers.0."))
    return model


def saved_bytes(fn, model: torch.nn.Module) -> int:
    """Bytes of the distinct non-parameter storages autograd saves while fn runs."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def measure(variant: str, layers: int, hidden: int, intermediate: int, batch: int, seq: int, dtype: str,
            reps: int) -> dict:
    """All figures of one variant, in this process."""
    from sparselayer.kernels.patch import use_fused_kernels
    from sparselayer.model.prefix_cache import LayerContext, run_layers

    model = build_stack(layers, hidden, intermediate, getattr(torch, dtype))
    if variant != "hf":
        use_fused_kernels(model, [0], "torch", suffix_mlp="swiglu" if variant == "fused-swiglu" else "recompute")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, seq, hidden, generator=g).to(model.dtype)
    probe = torch.randn(batch, seq, hidden, generator=g).to(model.dtype)
    pos = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    ctx = LayerContext(pos, model.model.rotary_emb(x, pos), {"full_attention": None})

    def forward() -> torch.Tensor:
        return (model.model.norm(run_layers(model, x, ctx, 0, layers)) * probe).sum()

    def step() -> None:
        forward().backward()
        model.zero_grad(set_to_none=True)

    result = dict(variant=variant, layers=layers, hidden=hidden, intermediate=intermediate, tokens=batch * seq,
                  dtype=dtype, threads=torch.get_num_threads())
    with RssPeak() as rss:
        step()
    kept = {}  # keeps the forward's output (and so its saved tensors) alive while they are counted
    result.update(rss_extra_bytes=rss.extra, saved_bytes=saved_bytes(lambda: kept.setdefault("out", forward()), model))
    kept.clear()
    result["alloc_extra_bytes"] = allocator_peak_cpu(step)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    result.update(time_s=statistics.median(times), times_s=times)
    return result


def run_child(args: dict) -> dict:
    """One variant in a fresh Python process."""
    result, stderr = run_worker(__file__, args)
    if result is None:
        raise RuntimeError(f"variant {args['variant']} failed:\n{stderr[-3000:]}")
    return result


def format_table(rows: list[dict]) -> str:
    """Markdown table, one line per variant, memory also relative to hf."""
    base = next(r for r in rows if r["variant"] == "hf")
    head = ["variant", "saved MiB", "alloc peak MiB", "rss peak MiB", "time s", "saved / hf", "alloc / hf"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append("| " + " | ".join([
            r["variant"], f"{r['saved_bytes'] / MiB:.1f}", f"{r['alloc_extra_bytes'] / MiB:.1f}",
            f"{r['rss_extra_bytes'] / MiB:.1f}", f"{r['time_s']:.2f}", f"{r['saved_bytes'] / base['saved_bytes']:.1%}",
            f"{r['alloc_extra_bytes'] / base['alloc_extra_bytes']:.1%}"]) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run every variant in its own process, print the table, write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12, help="trained layer + frozen layers above it")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(**json.loads(args.worker))))
        return 0
    shape = dict(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, batch=args.batch,
                 seq=args.seq, dtype=args.dtype, reps=args.reps)
    variants = ["hf"] + [v for v in args.variants if v != "hf"]
    rows = [run_child(dict(shape, variant=v)) for v in variants]
    table = format_table(rows)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, cpu_count=os.cpu_count(), date=time.strftime("%Y-%m-%d"))
    args.output.write_text(json.dumps(dict(meta=meta, shape=shape, results=rows, table=table), indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
