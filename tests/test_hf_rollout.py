"""The transformers engine's shared prompt prefill (a group's prompt computed once, its cache repeated for the
group's rows) and its reserved cache (keys and values written in place) against plain generate, which runs
every row's prompt into transformers' default cache: same scores (float32, 1e-5), same tokens."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from sparselayer.model.layout import load_model
from sparselayer.rollout.hf import HFRolloutEngine, left_padded, reserved_cache, shared_prefill

FAMILIES = ["qwen3", "qwen2", "llama"]


def _random_prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 99, (n,), generator=g).tolist() for n in lengths]


def _greedy(model, ids, mask, cache=None):
    out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, do_sample=False, max_new_tokens=6,
                         pad_token_id=0, eos_token_id=1, output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_shared_prefill_scores_match_plain_generate(tmp_path, family):
    model = load_model(make_tiny_model(tmp_path / family, model_type=family), "float32", "cpu")[0]
    group = 3
    ids, mask = left_padded(_random_prompts(7, [5, 1, 9, 2]), 0)  # padding, and a one-token prompt
    rows_ids, rows_mask = ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)
    plain_seq, plain_scores = _greedy(model, rows_ids, rows_mask)
    for capacity in (ids.shape[1] + 6, 3):  # sized for prompt + completion, and one that must grow
        cache = reserved_cache(model, capacity)
        assert shared_prefill(model, ids, mask, group, cache) and cache.get_seq_length() == ids.shape[1] - 1
        shared_seq, shared_scores = _greedy(model, rows_ids, rows_mask, cache)
        assert torch.isfinite(shared_scores).all()
        torch.testing.assert_close(shared_scores, plain_scores, rtol=1e-5, atol=1e-5)
        assert torch.equal(shared_seq, plain_seq)


@torch.no_grad()
def test_reserved_cache_alone_matches_plain_generate(tiny_model):
    model = load_model(tiny_model, "float32", "cpu")[0]
    ids, mask = left_padded(_random_prompts(11, [3, 8, 6]), 0)
    plain_seq, plain_scores = _greedy(model, ids, mask)
    shared_seq, shared_scores = _greedy(model, ids, mask, reserved_cache(model, ids.shape[1] + 6))
    assert torch.isfinite(plain_scores).all() and torch.isfinite(shared_scores).all()
    torch.testing.assert_close(shared_scores, plain_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(shared_seq, plain_seq)


def test_nothing_to_share_in_one_column(tiny_model):
    model = load_model(tiny_model, "float32", "cpu")[0]
    ids, mask = left_padded([[5], [6]], 0)
    cache = reserved_cache(model, 8)
    assert not shared_prefill(model, ids, mask, 4, cache) and cache.get_seq_length() == 0


@torch.no_grad()
def test_engine_rows_are_each_prompt_generated_alone(tiny_model):
    """Greedy rows of the engine (shared prefill, padded batch, chunks of whole groups) equal each prompt's own
    unpadded generate."""
    model, tokenizer = load_model(tiny_model, "float32", "cpu")
    prompts = _random_prompts(3, [4, 7, 2])
    engine = HFRolloutEngine(model, tokenizer, batch_size=4)  # two prompts' groups per chunk
    out = engine.generate(prompts, 2, 5, greedy=True)
    assert out.prompt_ids == [p for p in prompts for _ in range(2)]
    for i, p in enumerate(prompts):
        alone = model.generate(input_ids=torch.tensor([p]), do_sample=False, max_new_tokens=5, pad_token_id=0,
                               eos_token_id=1)[0, len(p):].tolist()
        alone = alone[: alone.index(1) + 1] if 1 in alone else alone
        assert out.completion_ids[2 * i] == alone and out.completion_ids[2 * i + 1] == alone
