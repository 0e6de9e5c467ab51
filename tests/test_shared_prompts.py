"""Shared prompts change nothing but cost: a group's prompt run once gives the same log-probs, loss and
trained-layer gradients as every row running its own copy (float32, relative 1e-5)."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from helpers import DigitShareTask

from sparselayer.batch import Batch
from sparselayer.config import TrainConfig
from sparselayer.errors import ConfigError
from sparselayer.model.logprobs import completion_logprobs
from sparselayer.model.prefix_cache import SHARE_MIN_FLOPS, compute_prefix, distinct_prompts, logprobs_from_prefix
from sparselayer.packing import pack_groups
from sparselayer.tasks.base import Example
from sparselayer.trainer import Trainer


class VariedPromptTask(DigitShareTask):
    """Prompts of different lengths, so a micro-batch of two groups has left-padded prompts."""

    @property
    def train(self):
        return [Example(p, "0") for p in ("1+2=", "12+34=", "123+45=", "7*8+90=", "5-3=", "40+2=")]


def _trainer(model, **extra) -> Trainer:
    """Two groups of 4 per micro-batch: arithmetic prompts of different lengths, so prompts are left-padded."""
    cfg = TrainConfig.from_mapping({"model": str(model), "layers": "2", "prompts_per_step": 4, "num_generations": 4,
                                    "micro_batch_size": 8, "dtype": "float32", "max_completion_length": 8,
                                    "seed": 5, "beta": 0.04, "quant": "none", "share_prompts": "on", **extra})
    return Trainer(cfg, task=VariedPromptTask())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float(((a - b).norm() / b.norm().clamp(min=1e-30)).detach())


def _padded_micro_batches(trainer: Trainer, sb) -> list:
    subs = [sb.batch.rows(rows) for rows in sb.micro_batches]
    prompt_lengths = {int(n) for sub in subs for n in sub.attention_mask[:, : sub.prompt_len].sum(dim=1)}
    assert len(prompt_lengths) > 1, "the test needs left-padded prompts"
    return subs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("start", [1, 3])
def test_shared_prefix_logprobs_equal_plain_forward(tiny_model, attn, start):
    trainer = _trainer(tiny_model, attn_implementation=attn)
    sb = trainer.rollout_batch()
    for sub in _padded_micro_batches(trainer, sb):
        entry = compute_prefix(trainer.model, sub, start, "on")
        assert entry.shared is not None and entry.shared.hidden.shape[0] == 2  # two distinct prompts of eight rows
        plain = completion_logprobs(trainer.model, sub)
        assert _rel(logprobs_from_prefix(trainer.model, entry, start), plain) <= 1e-5


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompts_same_loss_and_gradient(tiny_model, attn, checkpointing):
    """Shared vs per-row prompts through the whole cached step: reference log-probs, loss, gradients."""
    results = {}
    for share in (False, True):
        trainer = _trainer(tiny_model, attn_implementation=attn, share_prompts="on" if share else "off",
                           gradient_checkpointing=checkpointing)
        sb = trainer.rollout_batch()
        trainer.attach_prefix(sb)
        assert all((e.shared is not None) == share for e in sb.inputs.items)
        ref = sb.ref_logp = trainer.policy_logprobs(sb)
        stats = trainer.accumulate_gradients(sb)
        results[share] = (ref, stats["loss"], {n: p.grad.clone() for n, p in trainer.trained.items()})
    (ref0, loss0, grads0), (ref1, loss1, grads1) = results[False], results[True]
    assert _rel(ref1, ref0) <= 1e-5
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    for name, plain in grads0.items():
        assert plain.norm() > 0
        assert _rel(grads1[name], plain) <= 1e-5, name


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_shared_prompts_other_families(tmp_path, family):
    """Qwen2 and Llama attention hand the cache a fourth argument: shared prompts work there too."""
    model = make_tiny_model(tmp_path / family, num_layers=3, model_type=family)
    trainer = _trainer(model)
    sb = trainer.rollout_batch()
    for sub in _padded_micro_batches(trainer, sb):
        entry = compute_prefix(trainer.model, sub, 2, "on")
        assert entry.shared is not None
        assert _rel(logprobs_from_prefix(trainer.model, entry, 2), completion_logprobs(trainer.model, sub)) <= 1e-5


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_shared_prompts_with_quantized_frozen_layers(tiny_model, quant):
    """Through bitsandbytes' nf4 / LLM.int8() frozen layers, shared and per-row prompts agree too (each
    quantized matmul treats rows independently). Reference log-probs within 1e-5; gradients within 1e-5
    for int8, and bf16's 1e-2 for nf4, whose layers compute in bf16 (measured 6e-4: the two paths'
    matmuls have other shapes, so bf16 rounds differently)."""
    results = {}
    for share in ("off", "on"):
        trainer = _trainer(tiny_model, quant=quant, share_prompts=share)
        assert trainer.quant == quant
        sb = trainer.rollout_batch()
        trainer.attach_prefix(sb)
        assert all((e.shared is not None) == (share == "on") for e in sb.inputs.items)
        sb.ref_logp = trainer.policy_logprobs(sb)
        trainer.accumulate_gradients(sb)
        results[share] = (sb.ref_logp, {n: p.grad.clone() for n, p in trainer.trained.items()})
    assert _rel(results["on"][0], results["off"][0]) <= 1e-5
    tolerance = 1e-2 if quant == "nf4" else 1e-5
    for name, plain in results["off"][1].items():
        assert plain.norm() > 0
        assert _rel(results["on"][1][name], plain) <= tolerance, name


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prefix_without_padding(tiny_model, attn):
    """No padding at all: sdpa gets no mask from transformers (causal skip), so the completion rows'
    mask over prompt + completion keys is built here; it must match the plain forward too."""
    trainer = _trainer(tiny_model, attn_implementation=attn)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 20, (2, 5), generator=g).repeat_interleave(3, 0)
    ids = torch.cat([prompt, torch.randint(3, 20, (6, 6), generator=g)], dim=1)
    ones = torch.ones_like(ids)
    batch = Batch(ids, ones, ones[:, 5:], 5)
    entry = compute_prefix(trainer.model, batch, 2, "on")
    assert entry.shared is not None and entry.shared.hidden.shape[0] == 2
    if attn == "sdpa":
        assert entry.shared.context.masks["full_attention"] is None
    plain = completion_logprobs(trainer.model, batch)
    assert _rel(logprobs_from_prefix(trainer.model, entry, 2), plain) <= 1e-5


def test_auto_shares_only_where_it_pays(tiny_model, monkeypatch):
    """auto: the tiny model's saved work (6 rows x prompt x 2 x layer params) is far below the CPU
    threshold, so it runs per-row prompts; with the threshold at that figure it shares."""
    trainer = _trainer(tiny_model, share_prompts="auto")
    sb = trainer.rollout_batch()
    sub = sb.batch.rows(sb.micro_batches[0])
    layer_params = sum(p.numel() for p in trainer.model.model.layers[2].parameters())
    saved = (sub.input_ids.shape[0] - 2) * sub.prompt_len * 2 * layer_params
    assert saved < SHARE_MIN_FLOPS["cpu"]
    assert compute_prefix(trainer.model, sub, 2, "auto").shared is None
    monkeypatch.setitem(SHARE_MIN_FLOPS, "cpu", saved)
    assert compute_prefix(trainer.model, sub, 2, "auto").shared is not None
    monkeypatch.setitem(SHARE_MIN_FLOPS, "cpu", saved + 1)
    assert compute_prefix(trainer.model, sub, 2, "auto").shared is None
    assert compute_prefix(trainer.model, sub, 2, "off").shared is None
    with pytest.raises(ValueError, match="auto, on or off"):
        compute_prefix(trainer.model, sub, 2, "yes")


def test_step_reports_shared_micro_batches(tiny_model):
    metrics = _trainer(tiny_model, num_iterations=2).step()
    assert metrics["shared_micro_batches"] == 2  # 4 groups of 4 rows, two groups per micro-batch
    assert torch.isfinite(torch.tensor(metrics["loss"]))


def test_share_prompts_setting():
    assert TrainConfig.from_mapping({"share_prompts": True}).model.share_prompts == "on"  # YAML's on
    assert TrainConfig.from_mapping({"share_prompts": False}).model.share_prompts == "off"
    assert TrainConfig().model.share_prompts == "auto"
    with pytest.raises(ConfigError, match="--share-prompts"):
        TrainConfig.from_mapping({"share_prompts": "sometimes"}).validate()


def test_no_sharing_without_repeated_prompts(tiny_model):
    trainer = _trainer(tiny_model)
    sb = trainer.rollout_batch()
    rows = [0, 4, 8, 12]  # one row of each group: four distinct prompts
    sub = sb.batch.rows(rows)
    assert distinct_prompts(sub) is None
    assert compute_prefix(trainer.model, sub, 2, "on").shared is None
    index, first = distinct_prompts(sb.batch.rows(list(range(8))))
    assert index.tolist() == [index[0]] * 4 + [index[4]] * 4 and index[0] != index[4]
    assert sorted(first.tolist()) == [0, 4]


def test_pack_groups_keeps_groups_together():
    lengths = [5, 9, 7, 7, 3, 3, 4, 4, 8, 1, 1, 1]
    batches = pack_groups(lengths, 4, 8)  # three groups of four, two per micro-batch at most
    assert sorted(i for b in batches for i in b) == list(range(12))
    assert all(len(b) <= 8 for b in batches) and len(batches) == 2
    assert all({i // 4 for i in b} and all(sum(j // 4 == g for j in b) == 4 for g in {i // 4 for i in b})
               for b in batches)
    chunks = pack_groups(lengths, 4, 2)  # groups cut into chunks of two rows of similar length
    assert sorted(chunks) == [[0, 3], [1, 2], [4, 5], [6, 7], [8, 9], [10, 11]]
    assert pack_groups(lengths, 5, 4) == pack_groups(lengths, 1, 4)  # not whole groups: balanced rows
