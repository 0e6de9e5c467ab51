"""Rollouts with transformers' `generate` on the trainer's own model (colocated: nothing to push)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .base import EnginePrompt, RolloutEngine, Rollouts, prompt_token_ids


class HFRolloutEngine(RolloutEngine):
    """Samples from the live policy module; weight updates are already visible to it."""

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 512):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.no_grad()
    def generate(self, prompts: Sequence[EnginePrompt], num_generations: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, greedy: bool = False) -> Rollouts:
        """Sample with transformers' generate, in chunks of `batch_size` rows; prompts are text or token ids."""
        prompt_ids = prompt_token_ids(self.tokenizer, prompts)
        rows = [ids for ids in prompt_ids for _ in range(num_generations)]
        torch.manual_seed(seed)
        completions: list[list[int]] = []
        for start in range(0, len(rows), self.batch_size):
            completions += self._generate_chunk(rows[start : start + self.batch_size], max_new_tokens,
                                                temperature, top_p, greedy)
        return Rollouts(prompt_ids=rows, completion_ids=completions)

    def _generate_chunk(self, rows: list[list[int]], max_new_tokens: int, temperature: float,
                        top_p: float, greedy: bool) -> list[list[int]]:
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
        out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=not greedy,
                                  max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id, **sampling)
        self.model.train(was_training)
        return [cut_at_eos(row, tok.eos_token_id) for row in out[:, width:].tolist()]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """The engine shares the trainer's module, so the new weights are already in place."""
        return 0


def cut_at_eos(tokens: list[int], eos_id: int) -> list[int]:
    """Tokens up to and including the first EOS (generate pads finished rows after it)."""
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens
