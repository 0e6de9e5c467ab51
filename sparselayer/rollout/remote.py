"""Rollouts from a `sparselayer serve` process over HTTP, with layer-delta weight pushes.

Generation uses the server's OpenAI-compatible `/v1/completions` with token-id prompts (text prompts
tokenized with the trainer's tokenizer, token-id prompts sent as they are), asking for completion
token ids and their sampling log-probs. Weight pushes go through `sync.client.DeltaClient`, which also
carries these requests (one connection pool, the server's API key on each). Every generation response
names the weights version that produced all of it (`weights_version`).
"""
from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..errors import DataError, RemoteError
from ..sync.client import DeltaClient
from ..sync.delta import VERSION_HEADER
from .base import RolloutEngine, Rollouts

# override sampling defaults a served model's generation_config.json would add (Qwen3: top_k 20):
# the trainer samples with temperature and top-p only
PLAIN_SAMPLING = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def _token_ids(i: int, prompt) -> list[int]:
    """Prompt `i` as a list of Python ints; DataError unless it is a non-empty sequence of integers."""
    problem = DataError(f"prompt {i} is neither a string nor a non-empty list of token ids")
    if isinstance(prompt, (bytes, dict)) or not hasattr(prompt, "__iter__"):
        raise problem
    ids = []
    for t in prompt:
        if isinstance(t, bool):  # an int to Python, never a token id here
            raise problem
        try:
            ids.append(operator.index(t))
        except TypeError:
            raise problem from None
    if not ids:
        raise problem
    return ids


class RemoteRolloutEngine(RolloutEngine):
    """A `RolloutEngine` backed by `sparselayer serve` at `url`.

    `base_model` (the folder the server loaded) lets the first push travel sparse too; without it
    the first push of each tensor is dense. `api_key`: the server's key (`serve --api-key`); unset,
    the environment variable SPARSELAYER_API_KEY, if set.
    """

    dtype = torch.bfloat16  # pushes travel in bf16 (the sync check's tolerance)

    def __init__(self, url: str, tokenizer, base_model: str | Path | None = None, timeout: float = 600.0,
                 api_key: str | None = None):
        self.tokenizer = tokenizer
        self.sync = DeltaClient(url, base_model, timeout, api_key=api_key)
        self._model_name: str | None = None
        self.weights_version: int | None = None  # the weights version of the last generation response

    @property
    def url(self) -> str:
        """The server's base URL."""
        return self.sync.url

    @property
    def version(self) -> int | None:
        """The server's weights version this engine last saw (None: not asked yet; setting None resyncs)."""
        return self.sync.version

    @version.setter
    def version(self, value: int | None) -> None:
        if value is None:
            self.sync.resync()
        else:
            self.sync.version = value

    @property
    def pushed(self) -> dict[str, torch.Tensor]:
        """The bf16 tensors the server holds from this engine's pushes."""
        return self.sync.pushed

    @property
    def last_push(self) -> dict | None:
        """The server's answer to the last push (version, tensors, bytes, sparse, seconds)."""
        return self.sync.last_push

    def health(self) -> dict:
        """The server's model, weights version and served model name (remembered for generation)."""
        info = self.sync.health()
        self._model_name = info["served_model_name"][0]
        return info

    def _model(self) -> str:
        """The served model name requests must carry."""
        if self._model_name is None:
            self.health()
        return self._model_name

    def _prompt_ids(self, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
        """Token ids of each prompt: a string is tokenized (no special tokens), a sequence of token ids (e.g.
        a chat template already applied; ints, numpy or torch integers) is sent as it is; DataError otherwise."""
        return [self.tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else _token_ids(i, p)
                for i, p in enumerate(prompts)]

    def _complete(self, body: dict) -> list[dict]:
        """POST /v1/completions; its choices, recording the weights version that produced them."""
        resp = self.sync.call("POST", "/v1/completions", json=body)
        version = resp.headers.get(VERSION_HEADER)
        self.weights_version = int(version) if version and version.isdigit() else None
        return resp.json()["choices"]

    def generate(self, prompts: Sequence[str | Sequence[int]], num_generations: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, greedy: bool = False) -> Rollouts:
        """Sample `num_generations` completions per prompt (text, or token ids) on the server (token ids +
        sampling log-probs); all from one weights version, recorded in `weights_version`."""
        model = self._model()
        prompt_ids = self._prompt_ids(prompts)
        rows = [ids for ids in prompt_ids for _ in range(num_generations)]
        body = {"model": model, "max_tokens": max_new_tokens, "seed": seed, "logprobs": 0,
                "return_token_ids": True, "stop_token_ids": [self.tokenizer.eos_token_id], **PLAIN_SAMPLING}
        if greedy:  # vLLM's greedy sampling takes n=1: send each row as its own prompt
            body.update(prompt=rows, n=1, temperature=0.0)
        else:
            body.update(prompt=prompt_ids, n=num_generations, temperature=temperature, top_p=top_p)
        choices = sorted(self._complete(body), key=lambda c: c["index"])
        if len(choices) != len(rows):
            raise RemoteError(f"rollout server returned {len(choices)} completions, expected {len(rows)}")
        return Rollouts(prompt_ids=rows, completion_ids=[list(c["token_ids"]) for c in choices],
                        sampling_logprobs=[list(c["logprobs"]["token_logprobs"]) for c in choices])

    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        """The server's log-probs of tokens 1..n-1 of `token_ids` given their prefixes (for --check-sync)."""
        body = {"model": self._model(), "prompt": [list(token_ids)], "max_tokens": 1, "temperature": 1.0,
                "top_p": 1.0, "prompt_logprobs": 0, **PLAIN_SAMPLING}
        steps = self._complete(body)[0]["prompt_logprobs"]
        return [step[str(t)]["logprob"] for step, t in zip(steps[1:], token_ids[1:])]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Push what changed since the last push (checkpoint names); returns payload bytes (0: no change)."""
        return self.sync.push(named_tensors)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self.sync.close()
