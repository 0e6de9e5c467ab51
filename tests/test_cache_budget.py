"""--prefix-cache-budget: entries beyond the budget wait in CPU memory and give the same loss and gradient;
sizes parse or are refused with one line; the cache is freed once the batch is done."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from helpers import DigitShareTask, full_forward_logprobs

from sparselayer.cli import main
from sparselayer.config import TrainConfig
from sparselayer.errors import ConfigError
from sparselayer.model.cache_budget import entry_bytes
from sparselayer.sizes import parse_size
from sparselayer.trainer import Trainer


def _trainer(model, **extra) -> Trainer:
    cfg = TrainConfig.from_mapping({"model": str(model), "layers": "2", "prompts_per_step": 4, "num_generations": 4,
                                    "micro_batch_size": 5, "dtype": "float32", "quant": "none",
                                    "max_completion_length": 8, "seed": 11, "beta": 0.04, **extra})
    return Trainer(cfg, task=DigitShareTask())


@pytest.mark.parametrize("text, expected", [("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("1e9", 10**9),
                                            ("1.5GB", 1_500_000_000), (" 64 kb ", 64_000), ("0", 0),
                                            ("3G", 3 * 2**30), (4096, 4096)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1GiB", "2 GiBs", "1e999", "nan", "1.2.3MB"])
def test_bad_budget_is_refused(text, tiny_model, capsys, tmp_path):
    with pytest.raises(ConfigError, match="--prefix-cache-budget"):
        TrainConfig.from_mapping({"prefix_cache_budget": text}).validate()
    code = main(["train", "--model", str(tiny_model), f"--prefix-cache-budget={text}",
                 "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("sparselayer: error: --prefix-cache-budget"), err


def _loss_and_grads(trainer: Trainer):
    sb = trainer.rollout_batch()
    sb.ref_logp = full_forward_logprobs(trainer, sb)  # full forward (no cache yet)
    trainer.attach_prefix(sb)
    stats = trainer.accumulate_gradients(sb, 0)
    trainer.accumulate_gradients(sb, 1)  # a second pass, reading the spilled entries again
    return sb, stats["loss"], {n: p.grad.clone() for n, p in trainer.trained.items()}


@pytest.mark.parametrize("budget", ["1", "first"])
def test_budget_spills_and_changes_nothing(tiny_model, budget):
    _, loss, grads = _loss_and_grads(_trainer(tiny_model))
    if budget == "first":  # exactly the first micro-batch fits, the others spill
        probe = _trainer(tiny_model)
        sb = probe.rollout_batch()
        probe.attach_prefix(sb)
        budget = str(entry_bytes(sb.inputs.items[0]))
    trainer = _trainer(tiny_model, prefix_cache_budget=budget)
    sb, spilled_loss, spilled_grads = _loss_and_grads(trainer)
    n = len(sb.micro_batches)
    assert n > 1 and sb.inputs.budget.spilled == (n if budget == "1" else n - 1)
    assert all(e.hidden.device.type == "cpu" for e in sb.inputs.items)  # on a CPU device: where they were anyway
    assert spilled_loss == loss
    for name, grad in grads.items():
        assert grad.norm() > 0 and torch.equal(spilled_grads[name], grad), name


def test_no_budget_keeps_everything_on_the_device(tiny_model):
    trainer = _trainer(tiny_model)
    sb = trainer.rollout_batch()
    trainer.attach_prefix(sb)
    assert sb.inputs.budget.spilled == 0 and sb.inputs.budget.used == sum(entry_bytes(e) for e in sb.inputs.items) > 0


def test_step_frees_the_cache_before_the_push(tiny_model):
    trainer = _trainer(tiny_model, prefix_cache_budget="1KiB")
    refs, alive_at_push = [], []
    attach, push = trainer.attach_prefix, trainer.engine.update_weights

    def tracking_attach(sb):
        attach(sb)
        refs.extend(weakref.ref(e.hidden) for e in sb.inputs.items)

    def tracking_push(named):
        gc.collect()
        alive_at_push.append(sum(r() is not None for r in refs))
        return push(named)

    trainer.attach_prefix, trainer.engine.update_weights = tracking_attach, tracking_push
    trainer.step()
    assert refs and alive_at_push == [0]


def test_move_entry_moves_every_activation_and_leaves_the_original(tiny_model):
    """The spill/fetch copy walks hidden state, positions, rotary tables and masks (here to the meta device,
    the one other device a CPU-only machine has); tensors already on the target are shared, not copied."""
    from sparselayer.model.cache_budget import move_entry
    from sparselayer.model.cache_budget import tensors_in as _tensors

    trainer = _trainer(tiny_model)
    sb = trainer.rollout_batch()
    trainer.attach_prefix(sb)
    entry = sb.inputs.items[0]
    moved = move_entry(entry, torch.device("meta"))
    before, after = _tensors((entry.hidden, entry.context)), _tensors((moved.hidden, moved.context))
    assert len(after) == len(before) >= 4  # hidden, position ids, cos, sin (+ masks when materialized)
    assert all(t.device.type == "meta" for t in after) and all(t.device.type == "cpu" for t in before)
    assert [t.shape for t in after] == [t.shape for t in before]
    assert moved.context.masks.keys() == entry.context.masks.keys() and moved.batch is entry.batch
    same = move_entry(entry, torch.device("cpu"))
    assert same.hidden is entry.hidden
