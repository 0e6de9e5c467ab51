"""Pieces of the vLLM path that need no engine: head padding, change tracking, engine choice."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file

from sparselayer.config import TrainConfig
from sparselayer.errors import ConfigError
from sparselayer.model.layout import load_model
from sparselayer.rollout import build_engine
from sparselayer.rollout.hf import HFRolloutEngine
from sparselayer.sync.changes import ChangeTracker, fused_siblings
from sparselayer.sync.vllm_layout import plan_padding, write_padded_model
from sparselayer.sync.vllm_push import owning_modules


@pytest.mark.parametrize("model_type", ["qwen3", "llama"])
def test_padded_heads_compute_the_same_logits(tmp_path, model_type):
    folder = make_tiny_model(tmp_path / "m", hidden=32, model_type=model_type)  # head size 8
    padding, problem = plan_padding(json.loads((folder / "config.json").read_text()), "cpu")
    assert problem is None and (padding.head_dim, padding.padded) == (8, 32)
    padded = write_padded_model(folder, padding)
    ids = torch.tensor([[5, 9, 14, 3, 22, 17, 8, 30, 11]])
    logits = [load_model(f, "float32", "cpu")[0](input_ids=ids).logits for f in (folder, padded)]
    assert torch.allclose(logits[0], logits[1], atol=1e-4)
    pushed = {n: padding.apply(n, t) for n, t in load_file(folder / "model.safetensors").items()}
    assert all(torch.equal(pushed[n], t) for n, t in load_file(padded / "model.safetensors").items())


def test_unpaddable_models_are_refused_with_a_reason(tmp_path):
    qwen2 = make_tiny_model(tmp_path / "q2", hidden=32, model_type="qwen2")
    config = json.loads((qwen2 / "config.json").read_text())
    assert "head size 8" in plan_padding(config, "cpu")[1]
    assert plan_padding(config, "cuda") == (None, None)
    assert plan_padding({**config, "head_dim": 64}, "cpu") == (None, None)  # head size 64 is served as is


def test_change_tracker_reports_changed_tensors_and_fused_siblings():
    state = {f"model.layers.1.self_attn.{p}_proj.weight": torch.ones(2, 2) for p in "qkvo"}
    state["model.layers.1.mlp.up_proj.weight"] = torch.ones(3)
    state["model.layers.1.mlp.gate_proj.weight"] = torch.ones(3)
    tracker = ChangeTracker(torch.bfloat16)
    first = tracker.changed(state.items())
    assert set(first) == set(state) and all(t.dtype == torch.bfloat16 for t in first.values())
    tracker.mark_pushed(first)
    assert tracker.changed(state.items()) == {}
    state["model.layers.1.self_attn.v_proj.weight"] += 1e-5  # below bfloat16 resolution near 1: no change
    assert tracker.changed(state.items()) == {}
    state["model.layers.1.mlp.up_proj.weight"][0] = 2.0
    assert set(tracker.changed(state.items())) == {"model.layers.1.mlp.up_proj.weight",
                                                   "model.layers.1.mlp.gate_proj.weight"}
    assert fused_siblings("model.layers.3.self_attn.k_proj.bias") == [
        f"model.layers.3.self_attn.{p}_proj.bias" for p in "qkv"]
    assert owning_modules(["model.layers.3.mlp.up_proj.weight", "model.layers.3.input_layernorm.weight",
                           "model.norm.weight"]) == ["model.layers.3", "model.norm"]


def test_build_engine_follows_rollout_setting(tiny_model, tmp_path):
    model, tok = load_model(tiny_model, "float32", "cpu")
    for choice in ("hf", "auto"):  # the test suite sets SPARSELAYER_AUTO_ROLLOUT=hf
        config = TrainConfig.from_mapping({"model": str(tiny_model), "rollout": choice})
        assert isinstance(build_engine(config.rollout, config.model.model, model, tok), HFRolloutEngine)
    qwen2 = make_tiny_model(tmp_path / "q2", hidden=32, model_type="qwen2")
    config = TrainConfig.from_mapping({"model": str(qwen2), "rollout": "vllm"})
    with pytest.raises(ConfigError, match="head size 8.*--rollout hf"):
        build_engine(config.rollout, config.model.model, model, tok)
