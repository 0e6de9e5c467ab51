"""Rollouts with transformers' `generate` on the trainer's own model (colocated: nothing to push).

The rows of a GRPO group share their prompt, so its keys and values are computed once per group: one
forward over the distinct prompts (all but their last token) fills a cache that is then repeated for each
row of the group, and `generate` continues from it (the last prompt token onwards, per row). transformers'
own `generate` would run every row's prompt again, num_generations times (`shared_prefill`). The cache
holds its keys and values in buffers sized for prompt + completion once (`reserved_cache`): transformers'
default cache concatenates, copying the whole cache of every layer at every sampled token.

With capture on (--prefix-source rollout), a hook on the lowest trained layer keeps the hidden states
entering it in each forward: the prompt pass (with a shared prefill: the group's prompt once, then each row's
last prompt token), then one token per row and step. They are the
trainer's own numerics (the same module: same dtype, same quantized frozen layers), up to the rounding of
cached attention against the trainer's whole-sequence forward.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from ..batch import CapturedStates
from .base import EnginePrompt, RolloutEngine, Rollouts, prompt_token_ids
from .capture import CaptureSpec, CaptureSupport, StatePlacer, layer_inputs

RowStates = tuple[torch.Tensor, torch.Tensor]  # one row's (prompt states, completion states)


class HFRolloutEngine(RolloutEngine):
    """Samples from the live policy module; weight updates are already visible to it."""

    shares_weights = True  # the trainer's own module: nothing to push, nothing to check

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 512):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.capture: CaptureSpec | None = None

    def capture_support(self, dtype: torch.dtype, quant: str) -> CaptureSupport:
        """Always possible (the engine runs the trainer's own module: its dtype, its quantized frozen layers), but
        only on request: --prefix-source auto keeps the trainer's own pass with this engine."""
        return CaptureSupport(mismatch="transformers' generate is captured on request only (--prefix-source rollout)")

    def set_capture(self, spec: CaptureSpec | None) -> None:
        self.capture = spec

    @torch.no_grad()
    def generate(self, prompts: Sequence[EnginePrompt], num_generations: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, greedy: bool = False) -> Rollouts:
        """Sample with transformers' generate, whole groups at a time (at most `batch_size` rows, at least one
        group); prompts are text or token ids. With capture on (and not greedy: evaluation trains nothing),
        Rollouts.states holds the captured states."""
        prompt_ids = prompt_token_ids(self.tokenizer, prompts)
        rows = [ids for ids in prompt_ids for _ in range(num_generations)]
        capture = None if greedy else self.capture
        torch.manual_seed(seed)
        completions: list[list[int]] = []
        states: list[RowStates] = []
        per_chunk = max(1, self.batch_size // num_generations)
        for start in range(0, len(prompt_ids), per_chunk):
            done, seen = self._generate_chunk(prompt_ids[start : start + per_chunk], num_generations,
                                              max_new_tokens, temperature, top_p, greedy, capture)
            completions += done
            states += seen
        captured = None if capture is None else _captured(states, num_generations, capture)
        return Rollouts(prompt_ids=rows, completion_ids=completions, states=captured)

    def _generate_chunk(self, prompts: list[list[int]], group: int, max_new_tokens: int, temperature: float,
                        top_p: float, greedy: bool, capture: CaptureSpec | None
                        ) -> tuple[list[list[int]], list[RowStates]]:
        """Completions of `group` rows per prompt (and, with `capture`, each row's captured states)."""
        tok, device = self.tokenizer, next(self.model.parameters()).device
        ids, mask = left_padded(prompts, tok.pad_token_id)
        width = ids.shape[1]
        sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
        was_training = self.model.training
        self.model.eval()
        layer = self.model.model.layers[capture.layer] if capture else None
        with layer_inputs(layer) if layer is not None else nullcontext([]) as seen:
            cache = reserved_cache(self.model, width + max_new_tokens)
            shared = group > 1 and shared_prefill(self.model, ids.to(device), mask.to(device), group, cache)
            out = self.model.generate(input_ids=ids.repeat_interleave(group, 0).to(device),
                                      attention_mask=mask.repeat_interleave(group, 0).to(device),
                                      past_key_values=cache, do_sample=not greedy, max_new_tokens=max_new_tokens,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **sampling)
        self.model.train(was_training)
        completions = [cut_at_eos(row, tok.eos_token_id) for row in out[:, width:].tolist()]
        rows = [r for r in prompts for _ in range(group)]
        if not capture:
            return completions, []
        return completions, _row_states(seen, rows, completions, group if shared else 0)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """The engine shares the trainer's module, so the new weights are already in place."""
        return 0


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows left-padded to the longest (ids, attention mask), as generate takes them."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def shared_prefill(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, group: int, cache: Any) -> bool:
    """Fill `cache` with each distinct prompt's keys and values but for its last token, computed once, then repeat
    it `group` times (row order: prompt 0's group, then prompt 1's). False (cache untouched) where the prompts are
    a single column: nothing to share. `generate` on the repeated prompts then runs only their last token and
    the completions. Positions are generate's own for left padding (the running count of real tokens)."""
    if ids.shape[1] < 2:
        return False
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    model.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(group)
    return True


def reserved_cache(model: torch.nn.Module, capacity: int) -> Any:
    """transformers' DynamicCache for `model` whose full-attention layers write into buffers of `capacity`
    positions (ReservedLayer); other layer kinds (sliding windows) keep their own."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    reserved = _reserved_layer_class()
    cache.layers = [reserved(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@functools.cache
def _reserved_layer_class() -> type:
    """ReservedLayer, defined once on first use (sparselayer imports transformers lazily)."""
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A DynamicLayer whose keys and values are views into buffers of `capacity` positions, written in place
        as tokens arrive (a buffer grows, by a copy, only past its capacity)."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.buffers = capacity, None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = self.get_seq_length()
            end = n + key_states.shape[-2]
            if self.buffers is None or end > self.buffers[0].shape[-2] or self.buffers[0].shape[0] != len(key_states):
                self.buffers = tuple(self._grown(old, new, n, end) for old, new in
                                     ((self.keys, key_states), (self.values, value_states)))
            keys, values = self.buffers
            keys[..., n:end, :] = key_states
            values[..., n:end, :] = value_states
            self.keys, self.values = keys[..., :end, :], values[..., :end, :]
            return self.keys, self.values

        def _grown(self, old: torch.Tensor, new: torch.Tensor, n: int, end: int) -> torch.Tensor:
            buffer = new.new_empty((*new.shape[:-2], max(end, self.capacity), new.shape[-1]))
            if n:
                buffer[..., :n, :] = old
            return buffer

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.buffers is not None:
                n = self.get_seq_length()
                self.buffers = tuple(b.repeat_interleave(repeats, dim=0) for b in self.buffers)
                self.keys, self.values = (b[..., :n, :] for b in self.buffers)

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            super().batch_select_indices(indices)
            self.buffers = None  # the next update copies the selected rows into a fresh buffer

        def reset(self) -> None:
            self.buffers = None
            super().reset()

    return ReservedLayer


def _row_states(seen: list[torch.Tensor], rows: list[list[int]], completions: list[list[int]],
                shared_group: int = 0) -> list[RowStates]:
    """Split the layer's inputs during one generate call into each row's prompt and completion states.

    Without a shared prefill (`shared_group` 0) the first forward holds the left-padded prompts, every later one
    the previous step's token of each row. With one, the first forward holds the distinct prompts but their last
    token (one row per group), the second each row's last prompt token, and every later one a step's token."""
    if shared_group:
        head, last = seen[0], seen[1]
        width = head.shape[1] + 1
        later = seen[2:]
        prompt_of = [torch.cat([head[i // shared_group], last[i]], dim=0) for i in range(len(rows))]
    else:
        width = seen[0].shape[1]
        later = seen[1:]
        prompt_of = list(seen[0])
    steps = torch.cat(later, dim=1) if later else seen[0][:, :0]
    return [(prompt_of[i][width - len(r):], steps[i, : max(len(c) - 1, 0)])
            for i, (r, c) in enumerate(zip(rows, completions))]


def _captured(states: list[RowStates], group_size: int, spec: CaptureSpec) -> CapturedStates:
    """Prompt states once per group (its first row's), completion states per row, placed by the budget."""
    placer = StatePlacer(spec)
    prompts = [placer.place(p) for p, _ in states[::group_size]]
    return CapturedStates(spec.layer, prompts, [placer.place(c) for _, c in states])


def cut_at_eos(tokens: list[int], eos_id: int) -> list[int]:
    """Tokens up to and including the first EOS (generate pads finished rows after it)."""
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens
