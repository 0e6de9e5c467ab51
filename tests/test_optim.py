"""The trained layer's optimizer: fp32 master weights keep updates that bf16 would round away; their state
survives a checkpoint; bitsandbytes' 8-bit AdamW runs (on CPU too)."""
from __future__ import annotations

import io

import bitsandbytes as bnb
import pytest
import torch
from helpers import DigitShareTask

from sparselayer.config import TrainConfig
from sparselayer.errors import ConfigError
from sparselayer.optim import MasterAdamW, MasterWeights, build_optimizer, grad_tensors
from sparselayer.runs import RunDir
from sparselayer.train import restore_checkpoint, save_checkpoint
from sparselayer.trainer import Trainer

LR = 1e-4


def _steps(optimizer, param: torch.Tensor, grad: torch.Tensor, n: int) -> None:
    for _ in range(n):
        optimizer.zero_grad(set_to_none=True)
        param.grad = grad.clone()
        optimizer.step()


def test_master_weights_keep_updates_that_bf16_rounds_away():
    """Adam moves each weight by about lr = 1e-4 per step; near 1.0 bf16 steps are 2^-8..2^-7, so in-place
    bf16 AdamW never moves, while 100 steps on the fp32 master (about -0.01) show in the bf16 weight."""
    grad = torch.full((64,), 0.5, dtype=torch.bfloat16)
    plain = torch.ones(64, dtype=torch.bfloat16, requires_grad=True)
    _steps(torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.0), plain, grad, 100)
    assert torch.equal(plain.detach(), torch.ones(64, dtype=torch.bfloat16)), "bf16 AdamW lost the updates"

    param = torch.ones(64, dtype=torch.bfloat16, requires_grad=True)
    optimizer = build_optimizer([param], lr=LR)
    assert isinstance(optimizer, MasterAdamW)
    _steps(optimizer, param, grad, 100)
    master = optimizer.masters[0]
    assert master.dtype == torch.float32
    assert torch.allclose(master, torch.full_like(master, 1 - 100 * 1e-4), atol=2e-4)
    assert torch.equal(param.detach(), master.to(torch.bfloat16)), "the bf16 weight is the rounded master"
    assert float(param.detach()[0]) < 1.0


def test_micro_batch_gradients_are_summed_in_fp32():
    """Eight backward passes into a bf16 weight: the master's .grad is the fp32 sum of the eight bf16
    gradients (bit for bit), the bf16 .grad is freed, and clipping sees the fp32 sum."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 16, bias=False).to(torch.bfloat16)
    optimizer = build_optimizer([layer.weight], lr=LR)
    inputs = [torch.randn(4, 16, dtype=torch.bfloat16) for _ in range(8)]
    singles = [torch.autograd.grad(layer(x).float().pow(2).sum(), layer.weight)[0] for x in inputs]
    want = torch.zeros(16, 16)
    for g in singles:
        want += g.float()
    in_bf16 = torch.stack(singles).sum(0, dtype=torch.bfloat16)
    for x in inputs:
        layer(x).float().pow(2).sum().backward()
    master = optimizer.masters[0]
    assert layer.weight.grad is None and master.grad.dtype == torch.float32
    assert torch.equal(master.grad, want)
    assert not torch.equal(in_bf16.float(), want), "the check needs a sum that bf16 rounds"
    assert grad_tensors(optimizer) == [master]
    norm = torch.nn.utils.clip_grad_norm_(grad_tensors(optimizer), 1.0)
    assert float(norm) == pytest.approx(float(want.norm()), rel=1e-6)
    before = master.clone()
    optimizer.step()
    assert not torch.equal(master, before) and torch.equal(layer.weight.detach(), master.to(torch.bfloat16))


def test_fp32_parameters_get_plain_adamw_and_groups_keep_their_lr():
    fp32 = torch.zeros(4, requires_grad=True)
    assert type(build_optimizer([fp32], lr=LR)) is torch.optim.AdamW
    a, b = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True), torch.zeros(4, dtype=torch.bfloat16,
                                                                                  requires_grad=True)
    optimizer = build_optimizer([{"params": [a]}, {"params": [b], "lr": 3e-3}], lr=LR)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 3e-3]
    assert all(p.dtype == torch.float32 for g in optimizer.param_groups for p in g["params"])


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit"])
def test_state_dict_round_trip_continues_identically(optim):
    """Save after 3 steps (through torch.save, as state.pt), load into a fresh optimizer: the next steps match."""
    torch.manual_seed(0)
    start = torch.randn(128, 64).to(torch.bfloat16)
    grads = [torch.randn(128, 64).to(torch.bfloat16) for _ in range(6)]

    def run(param, optimizer, gs):
        for g in gs:
            _steps(optimizer, param, g, 1)

    straight = start.clone().requires_grad_(True)
    opt = build_optimizer([straight], optim, LR)
    run(straight, opt, grads)

    first = start.clone().requires_grad_(True)
    opt1 = build_optimizer([first], optim, LR)
    run(first, opt1, grads[:3])
    buffer = io.BytesIO()
    torch.save(opt1.state_dict(), buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert len(saved["master_weights"]) == 1 and saved["master_weights"][0].dtype == torch.float32
    resumed = first.detach().clone().requires_grad_(True)  # what trained.safetensors holds: bf16
    opt2 = build_optimizer([resumed], optim, LR)
    opt2.load_state_dict(saved)
    assert torch.equal(opt2.masters[0], opt1.masters[0])
    run(resumed, opt2, grads[3:])
    assert torch.equal(resumed.detach(), straight.detach())
    assert torch.equal(opt2.masters[0], opt.masters[0])


def test_adamw8bit_runs_on_cpu_with_8bit_state():
    param = torch.nn.Parameter(torch.randn(256, 64))  # >= 4096 elements: bitsandbytes keeps 8-bit moments
    optimizer = build_optimizer([param], "adamw8bit", LR)
    assert isinstance(optimizer, bnb.optim.AdamW8bit) and not isinstance(optimizer, MasterWeights)
    before = param.detach().clone()
    _steps(optimizer, param, torch.randn(256, 64), 2)
    assert not torch.equal(param.detach(), before) and torch.isfinite(param).all()
    assert optimizer.state[param]["state1"].dtype == torch.uint8
    low = torch.nn.Parameter(torch.randn(256, 64, dtype=torch.bfloat16))
    wrapped = build_optimizer([low], "adamw8bit", LR)
    assert isinstance(wrapped, MasterWeights) and isinstance(wrapped, bnb.optim.AdamW8bit)


def test_unknown_optimizer_refused():
    with pytest.raises(ConfigError, match="--optim must be adamw or adamw8bit"):
        build_optimizer([torch.zeros(4, requires_grad=True)], "sgd", LR)


def _trainer(model, **extra) -> Trainer:
    cfg = TrainConfig.from_mapping({"model": str(model), "layers": "1", "prompts_per_step": 2, "num_generations": 4,
                                    "micro_batch_size": 4, "max_completion_length": 6, "seed": 5,
                                    "learning_rate": 1e-3, **extra})
    return Trainer(cfg, task=DigitShareTask())


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit"])
def test_bf16_trainer_checkpoint_keeps_master_weights(tiny_model, tmp_path, optim):
    """A bf16 run: 2 steps, checkpoint, a fresh trainer resumes; its 3rd step equals the uninterrupted run's."""
    straight = _trainer(tiny_model, dtype="bfloat16", optim=optim)
    assert isinstance(straight.optimizer, MasterWeights)
    for _ in range(3):
        assert torch.isfinite(torch.tensor(straight.step()["loss"]))

    first = _trainer(tiny_model, dtype="bfloat16", optim=optim)
    first.step(), first.step()
    run = RunDir(tmp_path / "run").create()
    save_checkpoint(first, run)
    resumed = _trainer(tiny_model, dtype="bfloat16", optim=optim)
    assert restore_checkpoint(resumed, run) == 2
    assert all(torch.equal(a, b) for a, b in zip(resumed.optimizer.masters, first.optimizer.masters))
    resumed.step()
    for name, p in straight.trained.items():
        assert torch.equal(resumed.trained[name], p), name
    assert all(torch.equal(a, b) for a, b in zip(resumed.optimizer.masters, straight.optimizer.masters))
