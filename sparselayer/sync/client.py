"""The client side of the layer-delta protocol of `sparselayer serve`.

`DeltaClient` owns the HTTP connection to the server (with the server's API key, if it has one, on
every request), reads its health (model, weights version, served model name, limits) and pushes layer
deltas: it encodes the tensors against what the server holds as far as this client knows (sparse where
smaller) and posts the payload to `/sparselayer/delta`. The server answers each push with its new
weights version, which the next delta builds on.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import httpx
import torch

from ..errors import DeltaError, RemoteError
from .delta import API_KEY_ENV, DELTA_ROUTE, HEALTH_ROUTE, encode_delta, load_checkpoint_tensors, read_meta, to_bf16


def resolve_client_key(api_key: str | None) -> str | None:
    """The key to send: `api_key` (e.g. --rollout-api-key), else SPARSELAYER_API_KEY, else none."""
    return api_key or os.environ.get(API_KEY_ENV) or None


class DeltaClient:
    """Pushes layer deltas to `sparselayer serve` at `url` and remembers what the server holds.

    `base_model` (the folder the server loaded) lets the first push travel sparse too; without it
    the first push of each tensor is dense. `api_key` (else SPARSELAYER_API_KEY) is sent as
    `Authorization: Bearer KEY` with every request.
    """

    def __init__(self, url: str, base_model: str | Path | None = None, timeout: float = 600.0,
                 api_key: str | None = None):
        self.url, self.base_model = url.rstrip("/"), base_model
        key = resolve_client_key(api_key)
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)
        self.version: int | None = None  # the server's weights version this client last saw
        self.pushed: dict[str, torch.Tensor] = {}  # bf16 tensors the server holds from our pushes
        self.last_push: dict | None = None  # the server's answer to the last push

    def call(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One HTTP call to the server (any route), answered 200; RemoteError, or DeltaError for a refused
        delta, otherwise (one line, with the server's reason)."""
        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise RemoteError(f"rollout server {self.url} unreachable ({type(exc).__name__}: {exc})") from None
        if resp.status_code == 200:
            return resp
        try:
            err = resp.json().get("error")
            message = err.get("message") if isinstance(err, dict) else err
        except (ValueError, AttributeError):
            message = " ".join(resp.text[:200].split())  # one line, whatever answered
        if resp.status_code == 401:
            message = f"{message} (give the server's key with --rollout-api-key or {API_KEY_ENV})"
        cls = DeltaError if path == DELTA_ROUTE and resp.status_code in (400, 413) else RemoteError
        raise cls(f"rollout server refused {path} (HTTP {resp.status_code}): {message}")

    def request(self, method: str, path: str, **kwargs) -> dict:
        """One HTTP call to the server (any route) and its JSON answer; errors as `call`."""
        return self.call(method, path, **kwargs).json()

    def health(self) -> dict:
        """The server's model, weights version, served model name, limits and whether it pads heads."""
        return self.request("GET", HEALTH_ROUTE)

    def _base(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """What the server holds under `names`, as far as this client knows (empty: push dense).

        On first use the server's version is read; at version 0 it still holds the model folder's
        checkpoint, so those tensors are the base of the first (sparse) push.
        """
        if self.version is None:
            self.version = self.health()["version"]
            if self.version == 0 and self.base_model is not None:
                self.pushed = load_checkpoint_tensors(self.base_model, names)
        return self.pushed

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Push what changed since the last push (checkpoint names); returns payload bytes (0: no change)."""
        new = {name: to_bf16(t, copy=True) for name, t in named_tensors}  # kept as the next base: no aliasing
        payload = encode_delta(new, self._base(new), self.version)
        if not read_meta(payload)["tensors"]:
            return 0
        self.last_push = self.request("POST", DELTA_ROUTE, content=payload,
                                      headers={"content-type": "application/octet-stream"})
        self.pushed.update(new)
        self.version = self.last_push["version"]
        return len(payload)

    def resync(self) -> None:
        """Forget what this client believes the server holds (after a refused push, or a server restart):
        the next push asks the server's version again and sends every tensor against the server's base."""
        self.version, self.pushed = None, {}

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self.http.close()
