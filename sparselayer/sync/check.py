"""--check-sync: after a push, vLLM's log-probs of a fixed sequence must equal the trainer's.

Tolerances are those of the engine's dtype: float32 kernels differ in summation order only,
bfloat16 (8-bit mantissa) rounds every activation.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SyncError
from ..model.logprobs import plain_head_logprobs
from ..tasks import Task
from ..tasks.chat import PromptRenderer

TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.02}
SYNC_TOKENS = 32  # length cap of the fixed sequence


def sync_sequence(tokenizer, task: Task, renderer: PromptRenderer | None = None) -> list[int]:
    """A fixed token sequence: the first training prompt as the engines see it (rendered by `renderer`, else
    the text tokenized), followed by its reference answer when it has one."""
    example = task.train[0]
    if renderer is not None:
        prompt = renderer.token_ids([example])[0]
    elif isinstance(example.prompt, str):
        prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    else:
        raise TypeError("a conversation prompt needs the renderer that turns it into token ids")
    answer = tokenizer(example.answer, add_special_tokens=False)["input_ids"] if example.answer else []
    return (list(prompt) + answer)[:SYNC_TOKENS]


@torch.no_grad()
def trainer_logprobs(model: nn.Module, token_ids: list[int]) -> torch.Tensor:
    """The trainer model's log p(token_t | tokens_<t) for t = 1..n-1 (float32)."""
    device = next(model.parameters()).device
    ids = torch.tensor([token_ids], device=device)
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    return plain_head_logprobs(model.lm_head, hidden, ids[:, 1:])[0].float().cpu()


def check_sync(engine, model: nn.Module, token_ids: list[int], tolerance: float) -> float:
    """Max |log-prob difference| between engine and trainer; SyncError when above `tolerance`."""
    ours = trainer_logprobs(model, token_ids)
    theirs = torch.tensor(engine.prompt_logprobs(token_ids))
    diff = float((ours - theirs).abs().max())
    if not diff <= tolerance:
        raise SyncError(f"rollout engine out of sync with the trainer after a weight push: max |log-prob "
                        f"difference| {diff:.3g} > {tolerance:g} over {len(token_ids) - 1} tokens of a fixed sequence")
    return diff
