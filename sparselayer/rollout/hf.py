"""Rollouts with transformers' `generate` on the trainer's own model (colocated: nothing to push).

With capture on (--prefix-source rollout), a hook on the lowest trained layer keeps the hidden states
entering it in each forward of `generate`: the prompt pass, then one token per row and step. They are the
trainer's own numerics (the same module: same dtype, same quantized frozen layers), up to the rounding of
cached attention against the trainer's whole-sequence forward.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import nullcontext

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
        """Sample with transformers' generate, in chunks of `batch_size` rows; prompts are text or token ids.
        With capture on (and not greedy: evaluation trains nothing), Rollouts.states holds the captured states."""
        prompt_ids = prompt_token_ids(self.tokenizer, prompts)
        rows = [ids for ids in prompt_ids for _ in range(num_generations)]
        capture = None if greedy else self.capture
        torch.manual_seed(seed)
        completions: list[list[int]] = []
        states: list[RowStates] = []
        for start in range(0, len(rows), self.batch_size):
            done, seen = self._generate_chunk(rows[start : start + self.batch_size], max_new_tokens,
                                              temperature, top_p, greedy, capture)
            completions += done
            states += seen
        captured = None if capture is None else _captured(states, num_generations, capture)
        return Rollouts(prompt_ids=rows, completion_ids=completions, states=captured)

    def _generate_chunk(self, rows: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                        greedy: bool, capture: CaptureSpec | None) -> tuple[list[list[int]], list[RowStates]]:
        """Completions of `rows` (and, with `capture`, each row's captured states)."""
        tok, device = self.tokenizer, next(self.model.parameters()).device
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
        was_training = self.model.training
        self.model.eval()
        layer = self.model.model.layers[capture.layer] if capture else None
        with layer_inputs(layer) if layer is not None else nullcontext([]) as seen:
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=not greedy,
                                      max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id, **sampling)
        self.model.train(was_training)
        completions = [cut_at_eos(row, tok.eos_token_id) for row in out[:, width:].tolist()]
        return completions, (_row_states(seen, rows, completions) if capture else [])

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """The engine shares the trainer's module, so the new weights are already in place."""
        return 0


def _row_states(seen: list[torch.Tensor], rows: list[list[int]], completions: list[list[int]]) -> list[RowStates]:
    """Split the layer's inputs during one generate call into each row's prompt and completion states: the
    first forward holds the left-padded prompts, every later one the previous step's token of each row."""
    width = seen[0].shape[1]
    steps = torch.cat(seen[1:], dim=1) if len(seen) > 1 else seen[0][:, :0]
    return [(seen[0][i, width - len(r):], steps[i, : max(len(c) - 1, 0)])
            for i, (r, c) in enumerate(zip(rows, completions))]


def _captured(states: list[RowStates], group_size: int, spec: CaptureSpec) -> CapturedStates:
    """Prompt states once per group (its first row's), completion states per row, placed by the budget."""
    placer = StatePlacer(spec)
    prompts = [placer.place(p) for p, _ in states[::group_size]]
    return CapturedStates(spec.layer, prompts, [placer.place(c) for _, c in states])


def cut_at_eos(tokens: list[int], eos_id: int) -> list[int]:
    """Tokens up to and including the first EOS (generate pads finished rows after it)."""
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens
