"""Remote mode: payload bytes of a one-step layer delta (sparse vs dense) and push seconds to `sparselayer serve`.

Part 1 (codec): one decoder layer of Qwen3-8B's shape (hidden 4096, MLP 12288, 32 query / 8 KV
heads of 128; 193M parameters), float32 master weights ~ N(0, 0.02), after one AdamW step: Adam's
first step moves every element by lr * sign(gradient), so the update is lr * sign(random). Payload
bytes and encode/decode seconds, C++ and Python, for each --lr.

Part 2 (--serve): a random 24-layer Qwen3 (hidden 512, MLP 1536, 8 heads of 64, vocabulary 4096)
served by `sparselayer serve` in another process; pushes of layer 12 (dense, then a one-step sparse
delta) and of every tensor (dense), timed at the client (encode + HTTP + apply) and at the server
(decode + vLLM load + prefix-cache reset). Medians over --repeats.

    python benchmarks/bench_remote.py                  # writes benchmarks/results/remote.json
    python benchmarks/bench_remote.py --serve --lr 1e-6 1e-5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
RESULTS = Path(__file__).resolve().parent / "results" / "remote.json"
QWEN3_8B_LAYER = {"self_attn.q_proj.weight": (4096, 4096), "self_attn.k_proj.weight": (1024, 4096),
                  "self_attn.v_proj.weight": (1024, 4096), "self_attn.o_proj.weight": (4096, 4096),
                  "mlp.gate_proj.weight": (12288, 4096), "mlp.up_proj.weight": (12288, 4096),
                  "mlp.down_proj.weight": (4096, 12288), "input_layernorm.weight": (4096,),
                  "post_attention_layernorm.weight": (4096,), "self_attn.q_norm.weight": (128,),
                  "self_attn.k_norm.weight": (128,)}


def adam_step(layer: dict[str, torch.Tensor], lr: float, seed: int) -> dict[str, torch.Tensor]:
    """The layer after one AdamW step of learning rate `lr` (every element moves by +-lr)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + lr * torch.randn(v.shape, generator=g).sign() for k, v in layer.items()}


def random_layer(shapes: dict[str, tuple[int, ...]], prefix: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Float32 weights ~ N(0, 0.02) (norm weights 1) under checkpoint names."""
    g = torch.Generator().manual_seed(seed)
    return {prefix + k: (torch.randn(s, generator=g) * 0.02 if len(s) == 2 else torch.ones(s))
            for k, s in shapes.items()}


def timed(fn, repeats: int):
    """(median seconds, last result) of `fn()`."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def bench_codec(lrs: list[float], repeats: int) -> list[dict]:
    """Payload bytes and encode/decode seconds of one-step deltas of a Qwen3-8B-shaped layer."""
    from sparselayer.sync import delta as D

    layer = random_layer(QWEN3_8B_LAYER, "model.layers.18.")
    base = {k: D.to_bf16(v) for k, v in layer.items()}
    shapes = {k: tuple(v.shape) for k, v in layer.items()}
    dense = len(D.encode_delta(layer, {}, 0))
    rows = []
    for lr in lrs:
        new = adam_step(layer, lr, seed=1)
        row = {"lr": lr, "dense_bytes": dense, "params": sum(v.numel() for v in layer.values())}
        for backend in ["cpp", "python"] if D.HAVE_EXTENSION else ["python"]:
            enc_s, payload = timed(lambda new=new, b=backend: D.encode_delta(new, base, 0, backend=b), repeats)
            dec_s, _ = timed(lambda p=payload, b=backend: D.decode_delta(p, shapes, base.__getitem__, 0, backend=b),
                             repeats)
            row.update({"payload_bytes": len(payload), f"encode_s_{backend}": enc_s, f"decode_s_{backend}": dec_s})
        changed = sum(int((D.to_bf16(new[k]).view(torch.int16) != base[k].view(torch.int16)).sum()) for k in new)
        row.update(changed_fraction=changed / row["params"], payload_over_dense=row["payload_bytes"] / dense)
        rows.append(row)
        print(f"lr {lr:g}: {changed / row['params']:.2%} of bf16 elements changed; payload "
              f"{row['payload_bytes'] / 2**20:.1f} MiB vs dense {dense / 2**20:.1f} MiB "
              f"({row['payload_over_dense']:.1%}); encode {row.get('encode_s_cpp', float('nan')):.2f} s C++, "
              f"{row['encode_s_python']:.2f} s Python", flush=True)
    return rows


def build_model(folder: Path) -> Path:
    """A random 24-layer Qwen3 (hidden 512, 8 heads of 64) with the character tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from sparselayer.data.make_default_model import build_tokenizer

    tok = build_tokenizer()
    config = Qwen3Config(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=24,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=256,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def bench_serve(lr: float, repeats: int) -> dict:
    """Client and server seconds of layer and full-model pushes to a `sparselayer serve` process."""
    import socket

    import httpx
    from transformers import AutoTokenizer

    from sparselayer.rollout.remote import RemoteRolloutEngine
    from sparselayer.sync import delta as D

    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        model = build_model(Path(tmp) / "model")
        proc = subprocess.Popen([sys.executable, "-m", "sparselayer.cli", "serve", "--model", str(model), "--port",
                                 str(port), "--max-model-len", "256", "--enforce-eager", "--kv-cache-memory-bytes",
                                 str(128 << 20)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    if httpx.get(url + D.HEALTH_ROUTE, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(1)
            engine = RemoteRolloutEngine(url, AutoTokenizer.from_pretrained(model), base_model=model)
            return _push_timings(engine, model, lr, repeats)
        finally:
            proc.terminate()
            proc.wait(timeout=120)


def _push_timings(engine, model: Path, lr: float, repeats: int) -> dict:
    """Median client/server seconds and bytes of: layer one-step sparse push, layer dense push, full push."""
    from sparselayer.sync import delta as D

    names = list(D.checkpoint_shapes(model))
    full = {k: v.float() for k, v in D.load_checkpoint_tensors(model, names).items()}
    layer = {k: v for k, v in full.items() if k.startswith("model.layers.12.")}
    out = {}
    cases = {"layer_sparse_one_step": lambda i: adam_step(layer, lr, seed=i),
             "layer_dense": lambda i: {k: v + (i + 1) * 0.01 for k, v in layer.items()},
             "full_model_dense": lambda i: {k: v + (i + 1) * 0.01 for k, v in full.items()}}
    for case, make in cases.items():
        client, server, sent = [], [], 0
        for i in range(repeats + 1):  # the first is a warm-up
            if case == "layer_sparse_one_step":
                engine.update_weights(layer.items())  # untimed: back to the base, so each push is one step
            new = make(i)
            start = time.perf_counter()
            sent = engine.update_weights(new.items())
            if i:
                client.append(time.perf_counter() - start)
                server.append(engine.last_push["seconds"])
        out[case] = {"bytes": sent, "client_s": statistics.median(client), "server_s": statistics.median(server),
                     "sparse_tensors": len(engine.last_push["sparse"])}
        print(f"{case}: {sent / 2**20:.2f} MiB, client {out[case]['client_s'] * 1e3:.0f} ms, "
              f"server {out[case]['server_s'] * 1e3:.0f} ms", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-6, 1e-5])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help="also time pushes to a sparselayer serve process")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    result = {"codec_qwen3_8b_layer": bench_codec(args.lr, args.repeats)}
    if args.serve:
        result["serve_24_layer_hidden_512"] = bench_serve(args.lr[0], args.repeats)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
