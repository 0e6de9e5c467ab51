"""The rollout-engine interface: sample completions for prompts, and receive changed weights.

Engines (transformers' generate, in-process vLLM, a remote `sparselayer serve`) return token ids
only (`sparselayer.batch.Rollouts`); the trainer turns them into padded tensors with
`sparselayer.batch.collate`, so every engine feeds the same training step. Prompts arrive as token-id
lists (the trainer renders every prompt once, chat template included, so that every engine samples
from the same tokens) or as text, which an engine tokenizes without special tokens
(`prompt_token_ids`). An engine that can also returns the residual stream entering the lowest trained
layer, which it computes anyway while sampling (`capture_support`, `set_capture`; rollout/capture.py).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

import torch

from ..batch import Batch, Rollouts, collate  # Batch, collate: re-exported for code written against this module
from .capture import CaptureSpec, CaptureSupport

__all__ = ["Batch", "EnginePrompt", "RolloutEngine", "Rollouts", "collate", "prompt_token_ids"]

EnginePrompt = str | Sequence[int]  # text (tokenized by the engine) or token ids (used as they are)


def prompt_token_ids(tokenizer, prompts: Sequence[EnginePrompt]) -> list[list[int]]:
    """Each prompt's token ids: a token-id list as it is, text through the tokenizer without special tokens."""
    return [tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else [int(t) for t in p]
            for p in prompts]


class RolloutEngine(ABC):
    """What the trainer needs from a generator of completions: every method and attribute it reads is here.

    Required: `generate` and `update_weights`. With defaults an engine may override: `dtype` (the precision it
    samples in: the sync check's tolerance), `tensor_parallel_size` (GPUs one engine spans), `shares_weights`
    (whether it samples from the trainer's own module, so nothing can drift), `prompt_logprobs` (for
    --check-sync), `capture_support`/`set_capture` (--prefix-source rollout) and `close`.
    """

    dtype: torch.dtype = torch.float32  # the precision the engine samples in
    tensor_parallel_size: int = 1  # GPUs one engine spans (--vllm-tensor-parallel-size)
    shares_weights: bool = False  # True: samples from the trainer's own module (no push, nothing to check)

    @abstractmethod
    def generate(self, prompts: Sequence[EnginePrompt], num_generations: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, greedy: bool = False) -> Rollouts:
        """Sample `num_generations` completions per prompt (greedy: argmax decoding); a prompt is text or token
        ids (`prompt_token_ids`), and Rollouts.prompt_ids holds the ids each row was sampled from."""

    @abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load the given tensors (checkpoint names) into the engine's model; return bytes received."""

    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        """log p(token_i | tokens before it) for i >= 1 under the engine's current weights (len(token_ids) - 1
        values): what --check-sync compares with the trainer after a push. Engines that cannot compute them
        raise NotImplementedError; engines with `shares_weights` are never asked."""
        raise NotImplementedError(f"{type(self).__name__} does not report prompt log-probs")

    def capture_support(self, dtype: torch.dtype, quant: str) -> CaptureSupport:
        """Whether this engine can return, with each rollout, the residual stream entering a decoder layer with
        the trainer's numerics (`dtype`, frozen layers quantized by `quant`); none by default."""
        return CaptureSupport(unavailable=f"the {type(self).__name__} rollout engine does not capture hidden states")

    def set_capture(self, spec: CaptureSpec | None) -> None:
        """Capture `spec.layer`'s input while sampling (Rollouts.states) from now on; None: stop capturing."""
        raise NotImplementedError(f"{type(self).__name__} does not capture hidden states")

    def close(self) -> None:  # noqa: B027 (optional hook: engines without resources keep the default)
        """Release what the engine holds (a vLLM engine, an HTTP client); nothing by default."""
