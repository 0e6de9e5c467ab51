"""Rollouts from a `sparselayer serve` process over HTTP, with layer-delta weight pushes.

Generation uses the server's OpenAI-compatible `/v1/completions` with token-id prompts (the
trainer's tokenizer), asking for completion token ids and their sampling log-probs. A weight push
encodes the tensors against what this client last pushed (sparse where smaller) and posts the
payload to `/sparselayer/delta`.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import httpx
import torch

from ..errors import DeltaError, RemoteError
from .base import RolloutEngine, Rollouts
from .delta import DELTA_ROUTE, HEALTH_ROUTE, encode_delta, load_checkpoint_tensors, read_meta, to_bf16


# override sampling defaults a served model's generation_config.json would add (Qwen3: top_k 20):
# the trainer samples with temperature and top-p only
PLAIN_SAMPLING = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


class RemoteRolloutEngine(RolloutEngine):
    """A `RolloutEngine` backed by `sparselayer serve` at `url`.

    `base_model` (the folder the server loaded) lets the first push travel sparse too; without it
    the first push of each tensor is dense.
    """

    dtype = torch.bfloat16  # pushes travel in bf16 (the sync check's tolerance)

    def __init__(self, url: str, tokenizer, base_model: str | Path | None = None, timeout: float = 600.0):
        self.url, self.tokenizer, self.base_model = url.rstrip("/"), tokenizer, base_model
        self.client = httpx.Client(base_url=self.url, timeout=timeout)
        self.version: int | None = None  # the server's weights version this client last saw
        self.pushed: dict[str, torch.Tensor] = {}  # bf16 tensors the server holds from our pushes
        self.last_push: dict | None = None  # the server's answer to the last push
        self._model_name: str | None = None

    def _request(self, method: str, path: str, **kwargs) -> dict:
        """One HTTP call; RemoteError (or DeltaError for a refused delta) with the server's message."""
        try:
            resp = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise RemoteError(f"rollout server {self.url} unreachable ({type(exc).__name__}: {exc})") from None
        if resp.status_code == 200:
            return resp.json()
        try:
            err = resp.json().get("error")
            message = err.get("message") if isinstance(err, dict) else err
        except ValueError:
            message = resp.text[:200]
        cls = DeltaError if path == DELTA_ROUTE and resp.status_code == 400 else RemoteError
        raise cls(f"rollout server refused {path} (HTTP {resp.status_code}): {message}")

    def health(self) -> dict:
        """The server's model, weights version and served model name."""
        info = self._request("GET", HEALTH_ROUTE)
        self._model_name = info["served_model_name"][0]
        return info

    def generate(self, prompts: Sequence[str], num_generations: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, greedy: bool = False) -> Rollouts:
        """Sample `num_generations` completions per prompt on the server (token ids + sampling log-probs)."""
        if self._model_name is None:
            self.health()
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        rows = [ids for ids in prompt_ids for _ in range(num_generations)]
        body = {"model": self._model_name, "max_tokens": max_new_tokens, "seed": seed, "logprobs": 0,
                "return_token_ids": True, "stop_token_ids": [self.tokenizer.eos_token_id], **PLAIN_SAMPLING}
        if greedy:  # vLLM's greedy sampling takes n=1: send each row as its own prompt
            body.update(prompt=rows, n=1, temperature=0.0)
        else:
            body.update(prompt=prompt_ids, n=num_generations, temperature=temperature, top_p=top_p)
        choices = sorted(self._request("POST", "/v1/completions", json=body)["choices"], key=lambda c: c["index"])
        if len(choices) != len(rows):
            raise RemoteError(f"rollout server returned {len(choices)} completions, expected {len(rows)}")
        return Rollouts(prompt_ids=rows, completion_ids=[list(c["token_ids"]) for c in choices],
                        sampling_logprobs=[list(c["logprobs"]["token_logprobs"]) for c in choices])

    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        """The server's log-probs of tokens 1..n-1 of `token_ids` given their prefixes (for --check-sync)."""
        if self._model_name is None:
            self.health()
        body = {"model": self._model_name, "prompt": [list(token_ids)], "max_tokens": 1, "temperature": 1.0,
                "top_p": 1.0, "prompt_logprobs": 0, **PLAIN_SAMPLING}
        steps = self._request("POST", "/v1/completions", json=body)["choices"][0]["prompt_logprobs"]
        return [step[str(t)]["logprob"] for step, t in zip(steps[1:], token_ids[1:])]

    def _base(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """What the server holds under `names`, as far as this client knows (empty: push dense)."""
        if self.version is None:
            self.version = self.health()["version"]
            if self.version == 0 and self.base_model is not None:
                self.pushed = load_checkpoint_tensors(self.base_model, names)
        return self.pushed

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Push what changed since the last push (checkpoint names); returns payload bytes (0: no change)."""
        new = {name: to_bf16(t, copy=True) for name, t in named_tensors}  # kept as the next base: no aliasing
        payload = encode_delta(new, self._base(new), self.version)
        if not read_meta(payload)["tensors"]:
            return 0
        self.last_push = self._request("POST", DELTA_ROUTE, content=payload,
                                       headers={"content-type": "application/octet-stream"})
        self.pushed.update(new)
        self.version = self.last_push["version"]
        return len(payload)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self.client.close()
