"""`sparselayer serve` under hostile or careless clients (issue 12, item 1), against the session's real server.

Each test is one problem found in the server before it was hardened: no key anywhere, paths in health,
non-finite pushes accepted, unbounded bodies, slow bodies, huge tensor counts, deep metadata, raw
Python messages, and pushes landing in the middle of a generation. Refusals must be one-line JSON with
no internal detail, and must apply nothing. No timing assertions: only generous timeouts.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import save as st_save
from test_serve import AUTH, BODY_TIMEOUT, KEY, LAYER, SEQUENCE, _engine, _layer, clean_refusal, shared_server

from sparselayer.errors import ConfigError, DeltaError
from sparselayer.sync import delta as D

PLAIN = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


@pytest.fixture(scope="session")
def served(request):
    """(url, model folder) of the session's one `sparselayer serve` (shared with tests/test_serve.py)."""
    return shared_server(request)


@pytest.fixture(scope="session")
def tok(served):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(served[1])


def _health(url: str) -> dict:
    return httpx.get(url + D.HEALTH_ROUTE, headers=AUTH, timeout=30).json()


def _post(url: str, payload: bytes) -> httpx.Response:
    return httpx.post(url + D.DELTA_ROUTE, content=payload, headers=AUTH, timeout=120)


def _payload(meta: dict, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    """A safetensors payload with any metadata (valid or not) under the sparselayer key."""
    return st_save(tensors or {}, metadata={D.META_KEY: json.dumps(meta)})


# ---------------------------------------------------------------- the key


ROUTES = [("POST", D.DELTA_ROUTE), ("GET", D.HEALTH_ROUTE), ("POST", "/v1/completions"), ("GET", "/v1/models"),
          ("GET", "/health"), ("GET", "/metrics"), ("GET", "/version")]


@pytest.mark.slow
@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", f"Basic {KEY}", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}"])
def test_every_route_needs_the_key(served, auth):
    """401 (one line, WWW-Authenticate: Bearer) on every route, ours and vLLM's, without the right key."""
    url, _ = served
    version = _health(url)["version"]
    headers = {"Authorization": auth} if auth else {}
    for method, route in ROUTES:
        body = D.encode_delta({}, {}, version) if route == D.DELTA_ROUTE else b'{"model": "model", "prompt": "1"}'
        resp = httpx.request(method, url + route, headers=headers, timeout=30,
                             content=body if method == "POST" else None)
        assert clean_refusal(resp, 401).startswith("missing or wrong API key"), route
        assert resp.headers["www-authenticate"] == "Bearer"
    assert _health(url)["version"] == version
    assert httpx.get(url + "/v1/models", headers=AUTH, timeout=30).status_code == 200


@pytest.mark.parametrize("argv", [["--host", "0.0.0.0"], ["--host", "::"], ["--api-key", ""]])
def test_unsafe_serve_refused_in_one_line(tmp_path, argv):
    """A non-loopback address without a key (or an empty key) is refused before vLLM starts: one line, exit 2."""
    model = make_tiny_model(tmp_path / "model")
    env = {k: v for k, v in os.environ.items() if k not in (D.API_KEY_ENV, "VLLM_API_KEY")}
    proc = subprocess.run([sys.executable, "-m", "sparselayer.cli", "serve", "--model", str(model),
                           "--port", "1", *argv], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparselayer: error: "), proc.stderr[-2000:]
    assert "--api-key" in lines[0]


def test_resolve_api_key(monkeypatch):
    """The flag, else SPARSELAYER_API_KEY; loopback needs no key; odd keys are refused in one line."""
    from sparselayer.sync.server import is_loopback, resolve_api_key

    monkeypatch.delenv(D.API_KEY_ENV, raising=False)
    assert resolve_api_key(None, "127.0.0.1") is None and resolve_api_key(None, "::1") is None
    assert resolve_api_key("k1", "0.0.0.0") == "k1"
    monkeypatch.setenv(D.API_KEY_ENV, "k2")
    assert resolve_api_key(None, "0.0.0.0") == "k2" and resolve_api_key("k1", "10.0.0.1") == "k1"
    for bad in ("has space", "line\nbreak", "é"):
        with pytest.raises(ConfigError, match="printable ASCII"):
            resolve_api_key(bad, "127.0.0.1")
    assert is_loopback("localhost") and is_loopback("127.0.0.2") and is_loopback("[::1]")
    assert not any(is_loopback(h) for h in ("", "0.0.0.0", "::", "192.168.1.2", "example.com"))


# ---------------------------------------------------------------- health


def _strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


@pytest.mark.slow
def test_health_shows_no_paths(served, tok):
    """Health names the model by its folder's name (also the served model name the client reads)."""
    url, model_dir = served
    info = _health(url)
    assert not [s for s in _strings(info) if "/" in s or os.sep in s or str(model_dir) in s]
    assert info["model"] == model_dir.name and info["served_model_name"] == [model_dir.name]
    limits = info["limits"]
    dense = sum(2 * t.numel() for t in D.load_checkpoint_tensors(model_dir, D.checkpoint_shapes(model_dir)).values())
    assert dense < limits["max_body_bytes"] < 2 * dense + (1 << 20)
    assert limits["max_tensors"] == len(D.checkpoint_shapes(model_dir)) and limits["body_timeout_s"] == BODY_TIMEOUT
    engine = _engine(served, tok)
    assert engine._model() == model_dir.name


# ---------------------------------------------------------------- finite values


@pytest.mark.slow
@pytest.mark.parametrize("case", ["dense_nan", "dense_inf", "sparse_nan", "sparse_neg_inf"])
def test_nonfinite_push_refused_and_server_still_generates(served, tok, case):
    url, model_dir = served
    engine = _engine(served, tok)
    layer = _layer(model_dir)
    engine.update_weights(layer.items())
    version, before = engine.version, engine.prompt_logprobs(SEQUENCE)
    name = LAYER + "mlp.down_proj.weight"
    bad = layer[name].clone()
    bad.view(-1)[7] = {"dense_nan": float("nan"), "dense_inf": float("inf"), "sparse_nan": float("nan"),
                       "sparse_neg_inf": float("-inf")}[case]
    if case.startswith("dense"):
        bad.view(-1)[: bad.numel() // 2] += 0.01  # enough changes that the delta travels dense
    payload = D.encode_delta({name: bad}, engine.pushed, version)
    assert D.read_meta(payload)["tensors"][0]["encoding"] == case.split("_")[0]
    assert "NaN or Inf" in clean_refusal(_post(url, payload), 400)
    assert engine.health()["version"] == version
    assert engine.prompt_logprobs(SEQUENCE) == before
    out = engine.generate(["12+34="], 4, 8, seed=1)
    assert all(torch.isfinite(torch.tensor(lp)).all() for lp in out.sampling_logprobs)
    assert engine.weights_version == version


def test_decode_refuses_nonfinite_values():
    """The codec-level check behind the server's, on both encodings (no server needed)."""
    base = {"w": D.to_bf16(torch.zeros(64, 64))}
    for value, dense in [(float("nan"), True), (float("inf"), False), (float("-inf"), True)]:
        new = base["w"].float().clone()
        new.view(-1)[: 3000 if dense else 3] = 1.0
        new[5, 5] = value
        with pytest.raises(DeltaError, match="NaN or Inf"):
            D.decode_delta(D.encode_delta({"w": new}, base, 0), {"w": (64, 64)}, base.__getitem__, 0)


# ---------------------------------------------------------------- body size and time


def _exchange(url: str, head: bytes, parts: list[bytes] = (), interval: float = 0.0,
              timeout: float = 120.0) -> tuple[int, dict]:
    """Send a request by hand (head, then each body part, `interval` s apart) and read the answer as soon as it
    comes, even mid-body; (status, JSON). Fails if none comes within `timeout` (generous, for a loaded host)."""
    host, port = url.removeprefix("http://").split(":")
    deadline, data, pending = time.monotonic() + timeout, b"", list(parts)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        while time.monotonic() < deadline:
            if pending:
                try:
                    sock.sendall(pending.pop(0))
                except OSError:  # the server answered and closed: read what it said
                    pending = []
            sock.settimeout(interval if pending and interval else 1.0)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            data += chunk
            head_end = data.find(b"\r\n\r\n")
            if head_end >= 0:
                lines = data[:head_end].decode().split("\r\n")
                length = int(next(v for k, _, v in (x.partition(":") for x in lines) if k.lower() == "content-length"))
                if len(data) >= head_end + 4 + length:
                    return int(lines[0].split()[1]), json.loads(data[head_end + 4 : head_end + 4 + length])
    raise AssertionError(f"no complete answer within {timeout} s: {data[:300]!r}")


def _head(length: int | None, key: str = KEY) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST {D.DELTA_ROUTE} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/octet-stream\r\n{framing}\r\n\r\n").encode()


def _check_refused(url: str, status: int, answer: tuple[int, dict], version: int) -> None:
    got, body = answer
    assert got == status and "\n" not in body["error"], body
    assert _health(url)["version"] == version


@pytest.mark.slow
@pytest.mark.parametrize("declared", ["limit+1", "2GB"])
def test_oversized_declared_body_refused_unread(served, declared):
    """413 from Content-Length alone: not one byte of the body is sent (the old server waited to read it all)."""
    url, _ = served
    info = _health(url)
    length = info["limits"]["max_body_bytes"] + 1 if declared == "limit+1" else 2 << 30
    _check_refused(url, 413, _exchange(url, _head(length)), info["version"])


@pytest.mark.slow
def test_oversized_chunked_body_refused_while_streaming(served):
    url, _ = served
    info = _health(url)
    size = info["limits"]["max_body_bytes"] + 1
    chunk = f"{size:x}\r\n".encode() + b"\0" * size  # one chunk, never finished: refused once past the limit
    _check_refused(url, 413, _exchange(url, _head(None), [chunk]), info["version"])


@pytest.mark.slow
def test_slow_body_times_out(served):
    """A body trickling in a byte a second is cut off at --body-timeout (the old server waited forever)."""
    url, _ = served
    version = _health(url)["version"]
    status, body = _exchange(url, _head(1000), [b"x"] * 1000, interval=1.0, timeout=BODY_TIMEOUT + 90)
    assert status == 408 and "--body-timeout" in body["error"]
    assert _health(url)["version"] == version


# ---------------------------------------------------------------- header caps and field types


def _hand_payload(header: dict) -> bytes:
    """A payload built by hand from a header (no tensor data): fast even for 300,000 entries."""
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text


@pytest.mark.slow
@pytest.mark.parametrize("empty, status", [(300_000, 413), (3_000, 400), (200, 400), (None, 400)])
def test_too_many_tensors_refused(served, empty, status):
    """Empty tensors by the hundred thousand (once a lock held for 11 s: now over the body cap), the thousand
    (over the header cap) or the hundred (once a 200 that applied nothing: over the tensor cap), or more
    entries than the checkpoint has tensors (None): refused before any tensor is read."""
    url, model_dir = served
    version, count = _health(url)["version"], len(D.checkpoint_shapes(model_dir))
    meta = {"format": D.FORMAT, "base_version": version, "tensors": []}
    if empty is None:
        meta["tensors"] = [{"name": f"t{i}", "shape": [1], "encoding": "dense", "crc": 0} for i in range(count + 1)]
        payload = _payload(meta)
    else:
        tensor = {"dtype": "BF16", "shape": [0], "data_offsets": [0, 0]}
        tensors = {f"x{i}": tensor for i in range(empty)}
        payload = _hand_payload({"__metadata__": {D.META_KEY: json.dumps(meta)}, **tensors})
    assert "over the limit" in clean_refusal(_post(url, payload), status)
    assert _health(url)["version"] == version


@pytest.mark.slow
@pytest.mark.parametrize("where", ["metadata", "header"])
@pytest.mark.parametrize("depth", [100_000, 2_000, 20])
def test_deeply_nested_metadata_refused(served, where, depth):
    """JSON nested 100,000 deep (over the size cap), 2,000 deep (past Python's recursion limit: it was an
    HTTP 500) or 20 deep (parsed, then refused by depth): a one-line 400 each time."""
    url, _ = served
    version = _health(url)["version"]
    deep = "[" * depth + "]" * depth
    if where == "metadata":
        text = json.dumps({"format": D.FORMAT, "base_version": version, "tensors": []})[:-1] + f', "x": {deep}}}'
        payload = st_save({}, metadata={D.META_KEY: text})
    else:
        header = (json.dumps({"__metadata__": {D.META_KEY: "{}"}})[:-1] + f', "x": {deep}}}').encode()
        payload = len(header).to_bytes(8, "little") + header
    error = clean_refusal(_post(url, payload), 400)
    assert ("over the limit" if depth == 100_000 else "nested deeper than 8 levels") in error
    assert _health(url)["version"] == version


@pytest.mark.slow
@pytest.mark.parametrize("field, value", [("name", ["model.layers.2.mlp.up_proj.weight"]), ("name", 7),
                                          ("shape", "64x64"), ("shape", [64, True]), ("encoding", ["dense"]),
                                          ("crc", "123"), ("entry", ["not", "an", "object"])])
def test_malformed_entry_fields_refused_cleanly(served, field, value):
    """A field of the wrong type is a one-line 400 naming the entry, never a raw Python message."""
    url, model_dir = served
    version = _health(url)["version"]
    name = LAYER + "mlp.up_proj.weight"
    t = D.load_checkpoint_tensors(model_dir, [name])[name]
    entry = {"name": name, "shape": list(t.shape), "encoding": "dense", "crc": D.crc(t)}
    entry = value if field == "entry" else {**entry, field: value}
    payload = _payload({"format": D.FORMAT, "base_version": version, "tensors": [entry]}, {"0": t})
    assert clean_refusal(_post(url, payload), 400).startswith("delta entry 0")
    assert _health(url)["version"] == version


# ---------------------------------------------------------------- one completion, one weights version


class _HFReference:
    """transformers' log-probs of completions under the checkpoint with a given layer 2 (bf16-rounded)."""

    def __init__(self, model_dir: Path, layer: dict[str, torch.Tensor]):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        state = {**self.model.state_dict(), **{k: v.float() for k, v in layer.items()}}
        self.model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in state.items()})

    def logprobs(self, prompt: list[int], completion: list[int]) -> torch.Tensor:
        from sparselayer.sync.check import trainer_logprobs

        return trainer_logprobs(self.model, prompt + completion)[-len(completion):]


class _HeldStream:
    """A streamed POST /v1/completions read by hand through a socket with a tiny receive buffer: until the test
    reads, the server cannot finish sending the response, so the request stays in flight whatever the speed
    of generation (the lock is held until the response body ends)."""

    def __init__(self, url: str, body: dict):
        host, port = url.removeprefix("http://").split(":")
        data = json.dumps(body).encode()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        self.sock.settimeout(300)
        self.sock.connect((host, int(port)))
        self.sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                          f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}

    def _recv(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, "the server closed the stream"
        self.buffer += chunk

    def wait_for_data(self) -> None:
        """Until the first streamed bytes arrive: the generation is under way."""
        while not self.buffer:
            self._recv()

    def read_all(self) -> list[str]:
        """The rest of the response (chunked transfer encoding decoded), as SSE lines."""
        body, pos = b"", 0
        while True:
            while b"\r\n" not in self.buffer[pos:]:
                self._recv()
            size_end = self.buffer.index(b"\r\n", pos)
            size = int(self.buffer[pos:size_end], 16)
            while len(self.buffer) < size_end + 2 + size + 2:
                self._recv()
            if size == 0:
                self.sock.close()
                return body.decode().splitlines()
            body += self.buffer[size_end + 2 : size_end + 2 + size]
            pos = size_end + 2 + size + 2


def _stream_choices(lines: list[str], n: int) -> tuple[list[list[int]], list[list[float]]]:
    """Token ids and sampling log-probs of each of `n` streamed completion choices (SSE lines)."""
    ids, logps = [[] for _ in range(n)], [[] for _ in range(n)]
    for line in lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        for choice in json.loads(line[6:])["choices"]:
            ids[choice["index"]] += choice["token_ids"] or []
            logps[choice["index"]] += choice["logprobs"]["token_logprobs"]
    return ids, logps


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


@pytest.mark.slow
def test_push_waits_for_the_generation_in_flight(served, tok):
    """A push sent while a streamed request of 128 completions is in flight waits until its response ends:
    every token of every completion comes from the version the response names; a generation sent while the
    push waits gets the new version. (The old server mixed old and new weights within a completion.)"""
    url, model_dir = served
    engine, pusher, later = (_engine(served, tok) for _ in range(3))
    layer = _layer(model_dir)
    engine.update_weights(layer.items())
    version = engine.version
    g = torch.Generator().manual_seed(1)
    moved = {n: t.float() + (torch.rand(t.shape, generator=g) < 0.05) * 0.5 if t.dim() == 2 else t.float()
             for n, t in layer.items()}
    # 128 completions of 50 tokens with top-20 log-probs: seconds of generation, and a response (about 5 MB)
    # larger than the socket buffers between server and test (under 3 MB), so it stays in flight until read
    prompt, n, length = tok("12+34=", add_special_tokens=False)["input_ids"], 128, 50
    body = {"model": engine._model(), "prompt": [prompt], "n": n, "max_tokens": length, "ignore_eos": True,
            "temperature": 1.0, "top_p": 1.0, "seed": 5, "logprobs": 20, "return_token_ids": True, "stream": True,
            **PLAIN}
    with ThreadPoolExecutor(2) as pool:
        stream = _HeldStream(url, body)
        assert stream.status == 200 and int(stream.headers[D.VERSION_HEADER.lower()]) == version
        stream.wait_for_data()
        push = pool.submit(pusher.update_weights, moved.items())
        _wait_for(lambda: push.done() or _health(url)["pushes_waiting"] == 1)
        assert not push.done(), "the push did not wait for the response in flight"
        info = _health(url)
        assert info["generations_in_flight"] == 1 and info["version"] == version
        after = pool.submit(later.generate, ["12+34="], 2, 4)  # waits for the push, which waits for the stream
        lines = stream.read_all()
        ids, logps = _stream_choices(lines, n)
        assert push.result(timeout=300) > 0 and pusher.last_push["version"] == version + 1
        after.result(timeout=300)
    assert later.weights_version == version + 1
    old, new = _HFReference(model_dir, layer), _HFReference(model_dir, moved)
    assert all(len(c) == length for c in ids)
    gaps = []
    for c, lp in zip(ids, logps):
        served_lp = torch.tensor(lp)
        assert (served_lp - old.logprobs(prompt, c)).abs().max() < 0.1  # every token from the old weights
        gaps.append(float((served_lp - new.logprobs(prompt, c)).abs().max()))
    assert min(gaps) > 0.2  # and the new weights would have given other log-probs: the push mattered
    engine.update_weights(layer.items())  # back to the checkpoint's layer 2


def test_weights_lock_prefers_the_writer():
    """While a push waits for a generation, later generations wait for the push (it cannot starve)."""
    from sparselayer.sync.server import WeightsLock

    async def scenario() -> list[str]:
        lock, events = WeightsLock(), []
        first_in = asyncio.Event()

        async def generation(tag: str, hold: float) -> None:
            async with lock.reading():
                events.append(f"{tag} start")
                first_in.set()
                await asyncio.sleep(hold)
                events.append(f"{tag} end")

        async def push() -> None:
            async with lock.writing_weights():
                events.append("push start")
                await asyncio.sleep(0.01)
                events.append("push end")

        a = asyncio.create_task(generation("a", 0.05))
        await first_in.wait()
        p = asyncio.create_task(push())
        await asyncio.sleep(0)
        b = asyncio.create_task(generation("b", 0))
        await asyncio.gather(a, p, b)
        return events

    assert asyncio.run(scenario()) == ["a start", "a end", "push start", "push end", "b start", "b end"]


def test_cancelled_waiters_do_not_block_the_lock():
    """A push cancelled while it waits (its client gone) lets the generations it held back in."""
    from sparselayer.sync.server import WeightsLock

    async def scenario() -> list[tuple[int, int, bool]]:
        lock, seen, done = WeightsLock(), [], asyncio.Event()

        async def generation() -> None:
            async with lock.reading():
                seen.append((lock.readers, lock.writers_waiting, lock.writing))
                await done.wait()

        async def push() -> None:
            async with lock.writing_weights():
                seen.append("pushed")

        first = asyncio.create_task(generation())
        await asyncio.sleep(0)
        waiting_push = asyncio.create_task(push())
        await asyncio.sleep(0)
        second = asyncio.create_task(generation())  # held back by the waiting push
        await asyncio.sleep(0.01)
        assert len(seen) == 1
        waiting_push.cancel()
        await asyncio.gather(waiting_push, return_exceptions=True)
        await asyncio.wait_for(asyncio.sleep(0.01), 5)
        done.set()
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        seen.append((lock.readers, lock.writers_waiting, lock.writing))
        return seen

    assert asyncio.run(scenario()) == [(1, 0, False), (2, 0, False), (0, 0, False)]
