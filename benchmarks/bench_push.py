"""Bytes and seconds of a layer-delta weight push vs a full-model reload, in the same in-process vLLM.

A random Qwen3-architecture model (24 layers, hidden 512, MLP 1536, 8 heads of 64, 4 KV heads) is
saved to a temporary folder and served by `VLLMRolloutEngine`. Each repeat gives one decoder layer
new values and pushes it (`update_weights`: change detection, vLLM's checkpoint-format loader
scoped to that layer, prefix-cache reset), then reloads every tensor through vLLM's stock
`reload_weights` (the full reload), and also times the stock reload fed with only that layer's
tensors (it still walks every module). Medians over --repeats after one warm-up.

    python benchmarks/bench_push.py                    # writes benchmarks/results/push.json
    python benchmarks/bench_push.py --vocab 4096 --dtype float32 --repeats 9
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

RESULTS = Path(__file__).resolve().parent / "results" / "push.json"


def build_model(folder: Path, args: argparse.Namespace) -> Path:
    """Save a random Qwen3 of the benchmark's shape with the character tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from sparselayer.data.make_default_model import build_tokenizer

    tok = build_tokenizer()
    config = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=4,
                         head_dim=64, max_position_embeddings=256, tie_word_embeddings=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(getattr(torch, args.dtype))
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(args: argparse.Namespace) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from sparselayer.rollout.vllm_engine import VLLMRolloutEngine

    folder = build_model(Path(tempfile.mkdtemp(prefix="bench-push-")) / "model", args)
    dtype = getattr(torch, args.dtype)
    engine = VLLMRolloutEngine(folder, AutoTokenizer.from_pretrained(folder), dtype, "cpu", max_model_len=256)
    state = {n: t.to(dtype) for n, t in load_file(folder / "model.safetensors").items()}
    prefix = f"model.layers.{args.layer}."
    layer = {n: t for n, t in state.items() if n.startswith(prefix)}
    probe = list(range(3, 40))
    rows: dict[str, list[float]] = {"layer push": [], "stock reload, layer tensors": [], "full reload": []}
    sizes: dict[str, int] = {}
    for rep in range(args.repeats + 1):
        for t in layer.values():
            t.add_(1e-2 * torch.randn_like(t))
        seconds, sizes["layer push"] = timed(lambda: engine.update_weights(layer.items()))
        pushed = engine.prompt_logprobs(probe)
        stock, _ = timed(lambda: engine.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": list(layer.items()), "is_checkpoint_format": True}))
        sizes["stock reload, layer tensors"] = sum(t.numel() * t.element_size() for t in layer.values())
        full, sizes["full reload"] = timed(lambda: engine.reload_all(state.items()))
        assert engine.prompt_logprobs(probe) == pushed, "layer push and full reload disagree"
        if rep:  # the first round warms up
            for key, value in zip(rows, (seconds, stock, full)):
                rows[key].append(value)
    medians = {k: statistics.median(v) for k, v in rows.items()}
    engine.close()
    return {"model": {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                      "vocab": args.vocab, "dtype": args.dtype, "pushed_layer": args.layer},
            "repeats": args.repeats, "seconds_median": medians, "seconds_all": rows, "bytes": sizes,
            "bytes_ratio": sizes["layer push"] / sizes["full reload"],
            "seconds_ratio": medians["layer push"] / medians["full reload"],
            "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores, torch {torch.__version__}"}


def print_table(result: dict) -> None:
    print(f"{'push':<30} {'bytes':>12} {'median s':>10} {'vs full (bytes)':>16} {'vs full (time)':>15}")
    full_b, full_s = result["bytes"]["full reload"], result["seconds_median"]["full reload"]
    for key, seconds in result["seconds_median"].items():
        b = result["bytes"][key]
        print(f"{key:<30} {b:>12,} {seconds:>10.4f} {b / full_b:>15.1%} {seconds / full_s:>15.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--layer", type=int, default=12, help="the pushed layer")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args)
    print_table(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
