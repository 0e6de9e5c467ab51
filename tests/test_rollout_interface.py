"""The rollout-engine interface is complete: whatever the trainer, the run, the evaluation and the sync
check read on an engine is a member of `RolloutEngine`, so a new engine needs nothing undocumented."""
from __future__ import annotations

import ast
from pathlib import Path

import torch

import sparselayer
from sparselayer.rollout.base import RolloutEngine
from sparselayer.rollout.hf import HFRolloutEngine

PACKAGE = Path(sparselayer.__file__).resolve().parent
CALLERS = ["trainer.py", "train.py", "evaluate.py", "sync/check.py", "sweep.py"]


def _is_engine(node: ast.expr) -> bool:
    """`engine`, `self.engine` or `trainer.engine`."""
    if isinstance(node, ast.Name):
        return node.id == "engine"
    return isinstance(node, ast.Attribute) and node.attr == "engine"


def _engine_uses(source: str) -> tuple[set[str], list[str]]:
    """Attributes read on an engine, and getattr/hasattr probes of one (which would hide a missing member)."""
    used, probes = set(), []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _is_engine(node.value):
            used.add(node.attr)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                and node.args and _is_engine(node.args[0])):
            probes.append(ast.unparse(node))
    return used, probes


def test_every_member_the_callers_use_is_on_the_interface():
    members = set(dir(RolloutEngine))
    for name in CALLERS:
        used, probes = _engine_uses((PACKAGE / name).read_text())
        assert used <= members, f"{name} uses engine members missing from RolloutEngine: {sorted(used - members)}"
        assert not probes, f"{name} probes the engine instead of using the interface: {probes}"


def test_defaults_and_required_methods():
    assert RolloutEngine.__abstractmethods__ == {"generate", "update_weights"}

    class Minimal(RolloutEngine):
        def generate(self, prompts, num_generations, max_new_tokens, temperature=1.0, top_p=1.0, seed=0,
                     greedy=False):
            raise AssertionError("not called")

        def update_weights(self, named_tensors):
            return 0

    engine = Minimal()
    assert (engine.dtype, engine.tensor_parallel_size, engine.shares_weights) == (torch.float32, 1, False)
    assert engine.capture_support(torch.float32, "none").unavailable
    engine.close()
    try:
        engine.prompt_logprobs([1, 2, 3])
    except NotImplementedError as e:
        assert "Minimal" in str(e)
    else:
        raise AssertionError("prompt_logprobs should be NotImplementedError by default")
    assert HFRolloutEngine.shares_weights  # samples from the trainer's module: nothing to push or check
