"""Remote mode: payload bytes of a one-step layer delta (sparse vs dense) and push seconds to `sparselayer serve`.

Part 1 (codec): one decoder layer of Qwen3-8B's shape (hidden 4096, MLP 12288, 32 query / 8 KV
heads of 128; 193M parameters), float32 master weights ~ N(0, 0.02), after one AdamW step: Adam's
first step moves every element by lr * sign(gradient), so the update is lr * sign(random). Payload
bytes and encode/decode seconds, C++ and Python, for each --lr, and a dense push of the layer. Also
the cost of the server's input checks (header caps and entry types, `check_header`, and every new value
finite, `check_finite`), timed on their own in the same run; they are part of the decode time.

Part 2 (--serve): a random 24-layer Qwen3 (hidden 512, MLP 1536, 8 heads of 64, vocabulary 4096)
served by `sparselayer serve` in another process; pushes of layer 12 (dense, then a one-step sparse
delta) and of every tensor (dense), timed at the client (encode + HTTP + apply) and at the server
(decode + vLLM load + prefix-cache reset). Then the same for layer 1 of a random two-layer Qwen3 with
Qwen3-8B's layer shape (vocabulary 4096), whose push times the input checks of part 1 are divided by.
Medians over --repeats.

    python benchmarks/bench_remote.py                  # writes benchmarks/results/remote.json
    python benchmarks/bench_remote.py --serve --lr 1e-6 1e-5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
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


def check_seconds(payload: bytes, shapes: dict[str, tuple[int, ...]], repeats: int) -> float:
    """Median seconds of the server's added input checks on `payload`: the header (`check_header` with the
    checkpoint's limits) and the finiteness of every new value (sparse: the values sent; dense: the tensor)."""
    from safetensors.torch import load

    from sparselayer.sync import delta as D

    raw, limits = load(payload), D.PayloadLimits.for_shapes(shapes)

    def checks() -> None:
        meta = D.check_header(payload, limits)
        for i, entry in enumerate(meta["tensors"]):
            D.check_finite(entry["name"], raw[str(i) if entry["encoding"] == "dense" else f"{i}.values"])

    return timed(checks, repeats)[0]


def _codec_row(row: dict, new: dict, base: dict, shapes: dict, repeats: int, backends: list[str]) -> dict:
    """Payload bytes, encode/decode seconds per backend and the checks' seconds of one push of `new` on `base`."""
    from sparselayer.sync import delta as D

    for backend in backends:
        enc_s, payload = timed(lambda b=backend: D.encode_delta(new, base, 0, backend=b), repeats)
        dec_s, _ = timed(lambda p=payload, b=backend: D.decode_delta(p, shapes, base.__getitem__, 0, backend=b),
                         repeats)
        row.update({"payload_bytes": len(payload), f"encode_s_{backend}": enc_s, f"decode_s_{backend}": dec_s})
    fast = backends[0]
    row["checks_s"] = check_seconds(payload, shapes, repeats)
    row["checks_over_decode"] = row["checks_s"] / row[f"decode_s_{fast}"]
    row["checks_over_push_codec"] = row["checks_s"] / (row[f"encode_s_{fast}"] + row[f"decode_s_{fast}"])
    return row


def bench_codec(lrs: list[float], repeats: int) -> list[dict]:
    """Payload bytes, encode/decode seconds and input-check seconds of one-step deltas of a Qwen3-8B-shaped
    layer (and of a dense push of it)."""
    from sparselayer.sync import delta as D

    layer = random_layer(QWEN3_8B_LAYER, "model.layers.18.")
    base = {k: D.to_bf16(v) for k, v in layer.items()}
    shapes = {k: tuple(v.shape) for k, v in layer.items()}
    dense = len(D.encode_delta(layer, {}, 0))
    backends = ["cpp", "python"] if D.HAVE_EXTENSION else ["python"]
    rows = []
    for lr in [*lrs, None]:  # None: the layer pushed dense (a first push without base_model)
        new = adam_step(layer, lr, seed=1) if lr is not None else layer
        row = {"lr": lr, "dense_bytes": dense, "params": sum(v.numel() for v in layer.values())}
        if lr is None:  # dense: no base, and the backends do the same work
            _codec_row(row, new, {}, shapes, repeats, backends[:1])
        else:
            _codec_row(row, new, base, shapes, repeats, backends)
        if lr is not None:
            changed = sum(int((D.to_bf16(new[k]).view(torch.int16) != base[k].view(torch.int16)).sum()) for k in new)
            row.update(changed_fraction=changed / row["params"], payload_over_dense=row["payload_bytes"] / dense)
        rows.append(row)
        enc, dec = row[f"encode_s_{backends[0]}"], row[f"decode_s_{backends[0]}"]
        print(f"{'dense' if lr is None else f'lr {lr:g}'}: payload {row['payload_bytes'] / 2**20:.1f} MiB vs dense "
              f"{dense / 2**20:.1f} MiB; encode {enc:.2f} s, decode {dec:.3f} s ({backends[0]}); checks "
              f"{row['checks_s'] * 1e3:.1f} ms = {row['checks_over_decode']:.1%} of decode, "
              f"{row['checks_over_push_codec']:.1%} of encode + decode", flush=True)
    return rows


# served models of part 2: the old 24-layer hidden-512 model (layer 12; layer and whole-model pushes), and a
# two-layer model with Qwen3-8B's layer shape (layer 1; the push time the input checks are weighed against)
SERVED = {
    "serve_24_layer_hidden_512": {"layer": 12, "full_model": True, "config": {
        "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 24, "num_attention_heads": 8,
        "num_key_value_heads": 4, "head_dim": 64}},
    "serve_qwen3_8b_layer": {"layer": 1, "full_model": False, "config": {
        "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 2, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128}},
}


def build_model(folder: Path, shape: dict) -> Path:
    """A random Qwen3 of `shape` (vocabulary 4096) with the character tokenizer, saved in bf16."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from sparselayer.data.make_default_model import build_tokenizer

    tok = build_tokenizer()
    config = Qwen3Config(vocab_size=4096, max_position_embeddings=256, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=None, **shape)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def bench_serve(spec: dict, lr: float, repeats: int) -> dict:
    """Client and server seconds of layer (and full-model) pushes to a `sparselayer serve` process."""
    import socket

    import httpx
    from transformers import AutoTokenizer

    from sparselayer.rollout.remote import RemoteRolloutEngine
    from sparselayer.sync import delta as D

    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        model = build_model(Path(tmp) / "model", spec["config"])
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
            return _push_timings(engine, model, spec, lr, repeats)
        finally:
            proc.terminate()
            proc.wait(timeout=120)


def _push_timings(engine, model: Path, spec: dict, lr: float, repeats: int) -> dict:
    """Median client/server seconds and bytes of: layer one-step sparse push, layer dense push, full push."""
    from sparselayer.sync import delta as D

    names = list(D.checkpoint_shapes(model))
    prefix = f"model.layers.{spec['layer']}."
    full = {k: v.float() for k, v in D.load_checkpoint_tensors(model, names).items()
            if spec["full_model"] or k.startswith(prefix)}
    layer = {k: v for k, v in full.items() if k.startswith(prefix)}
    out = {}
    cases = {"layer_sparse_one_step": lambda i: adam_step(layer, lr, seed=i),
             "layer_dense": lambda i: {k: v + (i + 1) * 0.01 for k, v in layer.items()}}
    if spec["full_model"]:
        cases["full_model_dense"] = lambda i: {k: v + (i + 1) * 0.01 for k, v in full.items()}
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


def checks_over_push(codec: list[dict], pushes: dict) -> dict:
    """The input checks' seconds (codec part) over the whole push's seconds at the client (serve part), for the
    one-step sparse push (first --lr) and the dense push of a Qwen3-8B-shaped layer."""
    sparse, dense = codec[0], next(r for r in codec if r["lr"] is None)
    return {"layer_sparse_one_step": sparse["checks_s"] / pushes["layer_sparse_one_step"]["client_s"],
            "layer_dense": dense["checks_s"] / pushes["layer_dense"]["client_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-6, 1e-5])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help="also time pushes to a sparselayer serve process")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    result = {"machine": f"{os.cpu_count()}-core {platform.machine()} CPU, torch threads {torch.get_num_threads()}",
              "command": " ".join(["python", *sys.argv]), "codec_qwen3_8b_layer": bench_codec(args.lr, args.repeats)}
    if args.serve:
        for name, spec in SERVED.items():
            print(name, flush=True)
            result[name] = bench_serve(spec, args.lr[0], args.repeats)
        result["checks_over_push_qwen3_8b_layer"] = share = checks_over_push(result["codec_qwen3_8b_layer"],
                                                                             result["serve_qwen3_8b_layer"])
        print("input checks / push time at the client, Qwen3-8B-shaped layer: "
              + ", ".join(f"{k} {v:.1%}" for k, v in share.items()), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
