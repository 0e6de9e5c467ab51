"""`sparselayer serve`: a vLLM OpenAI-compatible server plus an endpoint that takes layer deltas.

Any training stack can sample from it (`/v1/completions`, `/v1/chat/completions`, ...) and push the
layers it changed to `POST /sparselayer/delta` (a payload of `sparselayer.sync.delta`). The
server checks the whole payload before loading anything through vLLM's own weight-loading path
(`reload_weights`, checkpoint names: fused and repacked parameters are handled by vLLM), then resets
the prefix cache. It keeps the bf16 tensors it last applied as the base of the next sparse delta;
a tensor never pushed has the model folder's checkpoint tensor as its base. On CPU, a model whose
head size vLLM's attention lacks (the embedded default's 16) is served from a copy with padded
heads (`sync.vllm_layout`); deltas keep the checkpoint's shapes and are padded on the way in.
"""
from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from safetensors.torch import save_file

from ..errors import DeltaError, ModelError
from ..model.layout import check_model_dir
from .delta import DELTA_ROUTE, HEALTH_ROUTE, Delta, checkpoint_shapes, decode_delta, load_checkpoint_tensors
from .vllm_layout import HeadPadding, plan_serving, write_padded_model

CPU_KV_CACHE_BYTES = 1 << 30  # KV cache on a CPU host when no memory option is given
LAYER_PREFIX = re.compile(r"^.*?\.layers\.\d+\.")  # "model.layers.16." of a decoder-layer tensor name


@dataclass
class DeltaState:
    """What the server needs to decode the next delta: tensor shapes, applied bases, version."""

    model_dir: Path
    shapes: dict[str, tuple[int, ...]]
    bases: dict[str, torch.Tensor] = field(default_factory=dict)
    version: int = 0  # pushes applied since start (0: the model folder's weights)
    padding: HeadPadding | None = None  # CPU: heads vLLM cannot serve as they are, padded on the way in
    refused: dict[str, str] = field(default_factory=dict)  # tensor name -> why this server cannot load it
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def base_of(self, name: str) -> torch.Tensor:
        """The bf16 tensor the server holds now under `name` (read from the checkpoint on first use)."""
        if name not in self.bases:
            self.bases.update(load_checkpoint_tensors(self.model_dir, [name]))
        return self.bases[name]

    def decode(self, payload: bytes) -> Delta:
        """Validate and decode a payload against the current state (raises DeltaError)."""
        delta = decode_delta(payload, self.shapes, self.base_of, self.version)
        for name in delta.tensors.keys() & self.refused.keys():
            raise DeltaError(f"delta tensor {name}: {self.refused[name]}")
        return delta

    def whole_layers(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`tensors` plus every other tensor of the decoder layers they belong to, at its current value.

        vLLM's in-place reload rebuilds each module it touches from what is loaded, so a fused module
        (qkv_proj, gate_up_proj) given one of its shards would keep garbage in the others.
        """
        prefixes = {m.group(0) for name in tensors if (m := LAYER_PREFIX.match(name))}
        rest = [n for n in self.shapes if n not in tensors and any(n.startswith(p) for p in prefixes)]
        missing = [n for n in rest if n not in self.bases]
        if missing:  # one pass over the checkpoint shards for all of them
            self.bases.update(load_checkpoint_tensors(self.model_dir, missing))
        return {**tensors, **{n: self.bases[n] for n in rest}}


def refused_tensors(config: dict) -> dict[str, str]:
    """Tensors a push must not change here: on CPU vLLM's reload leaves a tied LM head's repacked copy stale."""
    if torch.cuda.is_available() or not config.get("tie_word_embeddings"):
        return {}
    return {"model.embed_tokens.weight": "tied to the LM head, whose repacked CPU copy vLLM's reload leaves "
                                         "stale; push decoder layers only"}


async def load_through_vllm(engine, tensors: dict[str, torch.Tensor], padding: HeadPadding | None = None) -> None:
    """Load checkpoint-named tensors with the workers' `reload_weights` (vLLM's loader: fused, repacked).

    Tensors cannot cross vLLM's engine RPC (its messages carry plain data), so they go through a
    safetensors file in a temporary folder on this host (RAM-backed /dev/shm when present), which
    the workers read as a partial checkpoint (vLLM then points the workers' model path at that
    folder, which nothing reads again: every later push names its own folder).
    """
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="sparselayer-delta-", dir=shm if shm.is_dir() else None) as tmp:
        if padding is not None:  # the served copy has padded heads; deltas keep the checkpoint's shapes
            tensors = {name: padding.apply(name, t).contiguous() for name, t in tensors.items()}
        await asyncio.to_thread(save_file, tensors, str(Path(tmp) / "model.safetensors"))
        await engine.collective_rpc("reload_weights", kwargs={"weights_path": tmp, "is_checkpoint_format": True})


async def apply_delta(engine, state: DeltaState, payload: bytes) -> dict:
    """Decode, validate, load through vLLM and reset the prefix cache; the push's summary."""
    start = time.perf_counter()
    async with state.lock:
        delta = await asyncio.to_thread(state.decode, payload)  # DeltaError: nothing applied
        if delta.tensors:
            await load_through_vllm(engine, state.whole_layers(delta.tensors), state.padding)
            await engine.reset_prefix_cache()
            state.bases.update(delta.tensors)
            state.version += 1
        version = state.version
    return {"version": version, "tensors": sorted(delta.tensors), "bytes": len(payload),
            "elements": sum(t.numel() for t in delta.tensors.values()),
            "sparse": sorted(k for k, v in delta.encodings.items() if v == "sparse"),
            "seconds": time.perf_counter() - start}


def build_router() -> APIRouter:
    """FastAPI routes of the delta endpoint and the health check."""
    router = APIRouter()

    @router.post(DELTA_ROUTE)
    async def push_delta(request: Request) -> JSONResponse:
        state: DeltaState = request.app.state.sparselayer
        try:
            result = await apply_delta(request.app.state.engine_client, state, await request.body())
        except DeltaError as exc:
            return JSONResponse({"error": str(exc), "version": state.version}, status_code=400)
        return JSONResponse(result)

    @router.get(HEALTH_ROUTE)
    async def health(request: Request) -> JSONResponse:
        state: DeltaState = request.app.state.sparselayer
        return JSONResponse({"status": "ok", "model": str(state.model_dir), "version": state.version,
                             "served_model_name": request.app.state.args.served_model_name,
                             "padded_heads": state.padding is not None})

    return router


def vllm_args(model: str | Path, host: str = "127.0.0.1", port: int = 8000, max_model_len: int | None = None,
              dtype: str = "auto", gpu_memory_utilization: float | None = None,
              enforce_eager: bool = False, kv_cache_memory_bytes: int | None = None,
              name: str | None = None) -> Namespace:
    """vLLM's own `vllm serve` arguments for these settings (its defaults for everything else)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = ["--model", str(model), "--host", host, "--port", str(port), "--dtype", dtype,
            "--logprobs-mode", "processed_logprobs",  # sampling log-probs after temperature/top-p, as sampled
            "--served-model-name", name or str(model)]
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    if gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    if kv_cache_memory_bytes is None and gpu_memory_utilization is None and not torch.cuda.is_available():
        kv_cache_memory_bytes = CPU_KV_CACHE_BYTES  # vLLM's CPU default reserves 92% of RAM
    if kv_cache_memory_bytes is not None:
        argv += ["--kv-cache-memory-bytes", str(kv_cache_memory_bytes)]
    if enforce_eager:
        argv.append("--enforce-eager")
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)
    return args


async def run_server(args: Namespace, state: DeltaState) -> None:
    """vLLM's API server (engine, app, uvicorn) with the sparselayer routes added; returns on SIGINT/SIGTERM."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server

    _, sock = setup_server(args, reuse_port=False)
    try:
        async with build_async_engine_client(args) as engine:
            tasks = await engine.get_supported_tasks()
            app = build_app(args, tasks, engine.model_config)
            app.include_router(build_router())
            app.state.sparselayer = state
            await init_app_state(engine, app.state, args, tasks)
            shutdown = await serve_http(app, sock=sock, host=args.host, port=args.port,
                                        log_level=args.uvicorn_log_level, access_log=False)
        await shutdown
    finally:
        sock.close()


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, max_model_len: int | None = None,
          dtype: str = "auto", gpu_memory_utilization: float | None = None, enforce_eager: bool = False,
          kv_cache_memory_bytes: int | None = None) -> None:
    """Serve `model` with vLLM on host:port, accepting layer deltas at /sparselayer/delta, until stopped."""
    import uvloop

    if not str(model).strip():  # an empty path would mean the embedded model to check_model_dir
        raise ModelError("--model is empty: give the folder of the model to serve")
    path = check_model_dir(model)  # ModelError before any engine starts: the model families the trainer takes
    plan = plan_serving(path, "cuda" if torch.cuda.is_available() else "cpu")
    if plan.problem:
        raise ModelError(plan.problem)
    padding = plan.padding
    served = write_padded_model(path, padding) if padding else path
    try:
        args = vllm_args(served, host, port, max_model_len, dtype, gpu_memory_utilization, enforce_eager,
                         kv_cache_memory_bytes, name=str(path))
        state = DeltaState(path, checkpoint_shapes(path), padding=padding, refused=refused_tensors(plan.config))
        uvloop.run(run_server(args, state))
    finally:
        if served != path:
            shutil.rmtree(served, ignore_errors=True)
