"""`sparselayer serve`: a vLLM OpenAI-compatible server plus an endpoint that takes layer deltas.

Any training stack can sample from it (`/v1/completions`, `/v1/chat/completions`, ...) and push the
layers it changed to `POST /sparselayer/delta` (a payload of `sparselayer.sync.delta`). The
server checks the whole payload before loading anything through vLLM's own weight-loading path
(`reload_weights`, checkpoint names: fused and repacked parameters are handled by vLLM), then resets
the prefix cache. It keeps the bf16 tensors it last applied as the base of the next sparse delta;
a tensor never pushed has the model folder's checkpoint tensor as its base. On CPU, a model whose
head size vLLM's attention lacks (the embedded default's 16) is served from a copy with padded
heads (`sync.vllm_layout`); deltas keep the checkpoint's shapes and are padded on the way in.

Guards, all answered with one-line JSON and nothing applied:
- with a key (`--api-key` or SPARSELAYER_API_KEY) every request, vLLM's routes included, must carry
  `Authorization: Bearer KEY` (401); without one the server listens on loopback only;
- a push's body is capped in size (413, from Content-Length before reading, or while streaming) and
  time (408), its header in size, depth and tensor count, and its values must be finite (400);
- a writer-preferring lock: a push waits for the generations in flight and new ones wait for it, so
  one response always comes from one weights version, which it names in `X-Sparselayer-Weights-Version`.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import shutil
import tempfile
import time
from argparse import Namespace
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from safetensors.torch import save_file
from starlette.requests import ClientDisconnect

from ..errors import ConfigError, DeltaError, ModelError
from ..model.layout import check_model_dir
from .delta import (
    API_KEY_ENV,
    DELTA_ROUTE,
    HEALTH_ROUTE,
    VERSION_HEADER,
    Delta,
    PayloadLimits,
    checkpoint_shapes,
    decode_delta,
    load_checkpoint_tensors,
)
from .vllm_layout import HeadPadding, plan_serving, write_padded_model

CPU_KV_CACHE_BYTES = 1 << 30  # KV cache on a CPU host when no memory option is given
LAYER_PREFIX = re.compile(r"^.*?\.layers\.\d+\.")  # "model.layers.16." of a decoder-layer tensor name
BODY_TIMEOUT_BASE_S = 60.0  # default body read timeout: this, plus one second per BODY_RATE bytes of the cap
BODY_RATE = 16 << 20  # the slowest link the default timeout allows a full-size push (bytes per second)
OWN_PREFIX = "/sparselayer/"  # our routes: never under the generation lock
log = logging.getLogger("sparselayer.serve")


@dataclass(frozen=True)
class ServeLimits:
    """What one push may cost the server: body bytes, seconds to receive them, and header caps."""

    max_body_bytes: int
    body_timeout: float
    payload: PayloadLimits

    @classmethod
    def for_checkpoint(cls, shapes: Mapping[str, tuple[int, ...]], max_body_bytes: int | None = None,
                       body_timeout: float | None = None, max_tensors: int | None = None,
                       max_metadata_bytes: int | None = None, max_metadata_depth: int | None = None) -> ServeLimits:
        """Defaults any valid push fits in (every checkpoint tensor dense in bf16, plus its header),
        each replaced by the value given; ConfigError for a value that is not positive."""
        given = {"--max-body-bytes": max_body_bytes, "--body-timeout": body_timeout, "--max-tensors": max_tensors,
                 "--max-metadata-bytes": max_metadata_bytes, "--max-metadata-depth": max_metadata_depth}
        for flag, value in given.items():
            if value is not None and not value > 0:
                raise ConfigError(f"{flag} must be positive, got {value}")
        derived = PayloadLimits.for_shapes(shapes)
        payload = PayloadLimits(max_tensors or derived.max_tensors, max_metadata_bytes or derived.max_header_bytes,
                                max_metadata_depth or derived.max_depth)
        dense = sum(2 * _numel(s) for s in shapes.values()) + derived.max_header_bytes + 8
        body = max_body_bytes or dense
        return cls(body, body_timeout or BODY_TIMEOUT_BASE_S + body / BODY_RATE, payload)

    def as_dict(self) -> dict:
        """The limits as health reports them (a client can size its pushes)."""
        return {"max_body_bytes": self.max_body_bytes, "body_timeout_s": round(self.body_timeout, 1),
                "max_tensors": self.payload.max_tensors, "max_metadata_bytes": self.payload.max_header_bytes,
                "max_metadata_depth": self.payload.max_depth}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class WeightsLock:
    """Writer-preferring read/write lock between generations (readers) and weight loads (the writer).

    A writer waits until no reader holds the lock; while it waits or writes no new reader enters, so a
    push cannot starve and no generation sees two weights versions. Releasing never awaits (safe in
    `finally` under cancellation): waiters are woken and re-check their condition.
    """

    def __init__(self) -> None:
        self.readers = 0  # generations holding the lock
        self.writers_waiting = 0  # pushes waiting for those to end
        self.writing = False
        self._waiters: list[asyncio.Future] = []

    async def _wait_until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[None]:
        """Hold off weight loads for the duration (and wait for a pending or running one first)."""
        await self._wait_until(lambda: not self.writing and not self.writers_waiting)
        self.readers += 1
        try:
            yield
        finally:
            self.readers -= 1
            self._wake()

    @asynccontextmanager
    async def writing_weights(self) -> AsyncIterator[None]:
        """Exclusive: wait for every reader to leave, keeping new readers out meanwhile."""
        self.writers_waiting += 1
        try:
            await self._wait_until(lambda: not self.writing and self.readers == 0)
        finally:
            self.writers_waiting -= 1
            self._wake()  # readers blocked by this writer re-check (it may have been cancelled)
        self.writing = True
        try:
            yield
        finally:
            self.writing = False
            self._wake()


@dataclass
class DeltaState:
    """What the server needs to decode the next delta: tensor shapes, applied bases, version, limits, locks."""

    model_dir: Path
    shapes: dict[str, tuple[int, ...]]
    bases: dict[str, torch.Tensor] = field(default_factory=dict)
    version: int = 0  # pushes applied since start (0: the model folder's weights)
    padding: HeadPadding | None = None  # CPU: heads vLLM cannot serve as they are, padded on the way in
    refused: dict[str, str] = field(default_factory=dict)  # tensor name -> why this server cannot load it
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one push at a time, decoding included
    limits: ServeLimits | None = None  # None: the checkpoint's defaults
    weights: WeightsLock = field(default_factory=WeightsLock)  # generations vs weight loads

    def __post_init__(self) -> None:
        if self.limits is None:
            self.limits = ServeLimits.for_checkpoint(self.shapes)

    def base_of(self, name: str) -> torch.Tensor:
        """The bf16 tensor the server holds now under `name` (read from the checkpoint on first use)."""
        if name not in self.bases:
            self.bases.update(load_checkpoint_tensors(self.model_dir, [name]))
        return self.bases[name]

    def decode(self, payload: bytes) -> Delta:
        """Validate and decode a payload against the current state (raises DeltaError, and only that:
        an unexpected failure of a decoding library is logged here and refused in one line)."""
        try:
            delta = decode_delta(payload, self.shapes, self.base_of, self.version, limits=self.limits.payload)
        except DeltaError:
            raise
        except Exception:  # noqa: BLE001 (input must never surface as a traceback or a 500)
            log.exception("delta payload could not be decoded")
            raise DeltaError("delta payload could not be decoded") from None
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
    """Decode and validate (generations go on meanwhile), then, under the write side of the weights
    lock, load through vLLM and reset the prefix cache; the push's summary."""
    start = time.perf_counter()
    async with state.lock:
        delta = await asyncio.to_thread(state.decode, payload)  # DeltaError: nothing applied
        if delta.tensors:
            async with state.weights.writing_weights():  # in-flight generations end first; new ones wait
                await load_through_vllm(engine, state.whole_layers(delta.tensors), state.padding)
                await engine.reset_prefix_cache()
                state.bases.update(delta.tensors)
                state.version += 1
        version = state.version
    return {"version": version, "tensors": sorted(delta.tensors), "bytes": len(payload),
            "elements": sum(t.numel() for t in delta.tensors.values()),
            "sparse": sorted(k for k, v in delta.encodings.items() if v == "sparse"),
            "seconds": time.perf_counter() - start}


class Refusal(Exception):
    """A request refused at the HTTP level (status and one-line reason) before any of its payload is used."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def refusal(status: int, message: str, **extra) -> JSONResponse:
    """The one-line JSON answer to a refused request; the connection closes (its body may be unread)."""
    headers = {"connection": "close"}
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def declared_length(request: Request) -> int | None:
    """The body size the request declares (Content-Length), None for a chunked body."""
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise Refusal(400, "Content-Length is not a number")
    return int(value)


async def read_body(request: Request, limits: ServeLimits) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed the cap (from Content-Length,
    before reading; or while streaming a chunked body) and with 408 past the read timeout, which bounds
    the whole body (a byte every few seconds does not extend it)."""
    declared = declared_length(request)
    if declared is not None and declared > limits.max_body_bytes:
        raise Refusal(413, _too_large(limits))
    try:
        return await asyncio.wait_for(_read_capped(request, limits), limits.body_timeout)
    except asyncio.TimeoutError:
        raise Refusal(408, f"delta payload not received within {limits.body_timeout:g} s "
                           "(serve --body-timeout)") from None
    except ClientDisconnect:
        raise Refusal(400, "client disconnected before the delta payload ended") from None


def _too_large(limits: ServeLimits) -> str:
    return f"delta payload over the limit of {limits.max_body_bytes} bytes (serve --max-body-bytes)"


async def _read_capped(request: Request, limits: ServeLimits) -> bytes:
    """The body's chunks as they arrive, stopped with 413 at the first byte past the cap."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise Refusal(413, _too_large(limits))
        chunks.append(chunk)
    return b"".join(chunks)


class ApiKeyMiddleware:
    """Pure ASGI: every HTTP and WebSocket request, on any route, must carry `Authorization: Bearer KEY`.

    vLLM's own key (VLLM_API_KEY) guards only /v1...; this one guards /sparselayer/*, /health, /metrics
    and the rest too. Keys are compared as SHA-256 digests with `hmac.compare_digest` (constant time,
    and the key's length does not leak either).
    """

    def __init__(self, app, key: str):
        self.app = app
        self._digest = hashlib.sha256(key.encode()).digest()

    def authorized(self, scope: dict) -> bool:
        """Whether the request's first Authorization header is `Bearer <the key>`."""
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                scheme, _, token = value.partition(b" ")
                given = hashlib.sha256(token.strip()).digest()
                return scheme.lower() == b"bearer" and hmac.compare_digest(given, self._digest)
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or self.authorized(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await refusal(401, "missing or wrong API key: send Authorization: Bearer KEY")(scope, receive, send)


class WeightsVersionMiddleware:
    """Pure ASGI: a generation request (any POST outside /sparselayer/) holds the read side of the weights
    lock from its first byte until its response body has been sent (streams included, as the inner app
    returns only then), and its response carries the weights version that produced it."""

    def __init__(self, app, state: DeltaState):
        self.app, self.state = app, state
        self._header = VERSION_HEADER.lower().encode()

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "").removeprefix(scope.get("root_path") or "")
        if scope["type"] != "http" or scope.get("method") != "POST" or path.startswith(OWN_PREFIX):
            await self.app(scope, receive, send)
            return
        async with self.state.weights.reading():
            version = str(self.state.version).encode()

            async def send_versioned(message: dict) -> None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", ()), (self._header, version)]}
                await send(message)

            await self.app(scope, receive, send_versioned)


def build_router() -> APIRouter:
    """FastAPI routes of the delta endpoint and the health check."""
    router = APIRouter()

    @router.post(DELTA_ROUTE)
    async def push_delta(request: Request) -> JSONResponse:
        state: DeltaState = request.app.state.sparselayer
        try:
            payload = await read_body(request, state.limits)
            result = await apply_delta(request.app.state.engine_client, state, payload)
        except Refusal as exc:
            return refusal(exc.status, str(exc), version=state.version)
        except DeltaError as exc:
            return JSONResponse({"error": str(exc), "version": state.version}, status_code=400)
        return JSONResponse(result)

    @router.get(HEALTH_ROUTE)
    async def health(request: Request) -> JSONResponse:
        state: DeltaState = request.app.state.sparselayer
        return JSONResponse({"status": "ok", "model": state.model_dir.name, "version": state.version,
                             "served_model_name": request.app.state.args.served_model_name,
                             "padded_heads": state.padding is not None,
                             "generations_in_flight": state.weights.readers,
                             "pushes_waiting": state.weights.writers_waiting, "limits": state.limits.as_dict()})

    return router


def vllm_args(model: str | Path, host: str = "127.0.0.1", port: int = 8000, max_model_len: int | None = None,
              dtype: str = "auto", gpu_memory_utilization: float | None = None,
              enforce_eager: bool = False, kv_cache_memory_bytes: int | None = None,
              name: str | None = None) -> Namespace:
    """vLLM's own `vllm serve` arguments for these settings (its defaults for everything else); requests
    name the model `name` (default: the folder's name, never its path)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = ["--model", str(model), "--host", host, "--port", str(port), "--dtype", dtype,
            "--logprobs-mode", "processed_logprobs",  # sampling log-probs after temperature/top-p, as sampled
            "--served-model-name", name or Path(model).name]
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


def add_guards(app, state: DeltaState, api_key: str | None) -> None:
    """The sparselayer routes, then, outermost, the key check and the generation lock (in that order).

    vLLM's SageMaker bootstrap has already built the middleware stack (so `add_middleware` refuses):
    the guards go in front of the app's middleware list and the stack is rebuilt, as that bootstrap does.
    """
    from starlette.middleware import Middleware

    app.include_router(build_router())
    app.state.sparselayer = state
    guards = [Middleware(WeightsVersionMiddleware, state=state)]
    if api_key:
        guards.insert(0, Middleware(ApiKeyMiddleware, key=api_key))
    app.user_middleware[:0] = guards
    if app.middleware_stack is not None:
        app.middleware_stack = app.build_middleware_stack()


async def run_server(args: Namespace, state: DeltaState, api_key: str | None = None) -> None:
    """vLLM's API server (engine, app, uvicorn) with the sparselayer routes and guards added; returns on
    SIGINT/SIGTERM."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server

    _, sock = setup_server(args, reuse_port=False)  # logs the arguments: the key is set only after
    if api_key:  # vLLM's own /v1 check then agrees with ours (an unrelated VLLM_API_KEY would lock clients out)
        args.api_key = [api_key]
    try:
        async with build_async_engine_client(args) as engine:
            tasks = await engine.get_supported_tasks()
            app = build_app(args, tasks, engine.model_config)
            add_guards(app, state, api_key)
            await init_app_state(engine, app.state, args, tasks)
            shutdown = await serve_http(app, sock=sock, host=args.host, port=args.port,
                                        log_level=args.uvicorn_log_level, access_log=False)
        await shutdown
    finally:
        sock.close()


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name, or "" (every interface)
        return False


def resolve_api_key(api_key: str | None, host: str) -> str | None:
    """The key every request must carry: `api_key`, else SPARSELAYER_API_KEY; ConfigError for an unusable
    key, or for none on a non-loopback address (anyone on the network could push weights)."""
    if api_key is not None and not api_key.strip():
        raise ConfigError("--api-key is empty: give a key, or leave the flag out")
    key = api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    if key is not None and not (key.isascii() and key.isprintable() and " " not in key):
        raise ConfigError("the API key must be printable ASCII without spaces (it travels in an HTTP header)")
    if key is None and not is_loopback(host):
        raise ConfigError(f"refusing to listen on {host or 'every interface'} without an API key: give --api-key "
                          f"KEY or set {API_KEY_ENV}, or listen on 127.0.0.1")
    return key


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, max_model_len: int | None = None,
          dtype: str = "auto", gpu_memory_utilization: float | None = None, enforce_eager: bool = False,
          kv_cache_memory_bytes: int | None = None, api_key: str | None = None, **limits: float | None) -> None:
    """Serve `model` with vLLM on host:port, accepting layer deltas at /sparselayer/delta, until stopped.

    `api_key` (else SPARSELAYER_API_KEY) guards every route; `limits`: the overrides of
    `ServeLimits.for_checkpoint` (max_body_bytes, body_timeout, max_tensors, max_metadata_bytes,
    max_metadata_depth). Every input problem is a one-line error before any engine starts.
    """
    import uvloop

    if not str(model).strip():  # an empty path would mean the embedded model to check_model_dir
        raise ModelError("--model is empty: give the folder of the model to serve")
    key = resolve_api_key(api_key, host)
    path = check_model_dir(model)  # ModelError before any engine starts: the model families the trainer takes
    plan = plan_serving(path, "cuda" if torch.cuda.is_available() else "cpu")
    if plan.problem:
        raise ModelError(plan.problem)
    shapes = checkpoint_shapes(path)
    serve_limits = ServeLimits.for_checkpoint(shapes, **limits)
    padding = plan.padding
    served = write_padded_model(path, padding) if padding else path
    try:
        args = vllm_args(served, host, port, max_model_len, dtype, gpu_memory_utilization, enforce_eager,
                         kv_cache_memory_bytes, name=path.name)
        state = DeltaState(path, shapes, padding=padding, refused=refused_tensors(plan.config), limits=serve_limits)
        uvloop.run(run_server(args, state, key))
    finally:
        if served != path:
            shutil.rmtree(served, ignore_errors=True)
