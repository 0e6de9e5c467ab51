"""The embedded default: shipped in the package, small, 24+ layers, partly competent, and RL lifts it."""
from __future__ import annotations

import json

import pytest

from sparselayer.config import TrainConfig
from sparselayer.data import DEFAULT_MODEL_DIR
from sparselayer.evaluate import evaluate_path
from sparselayer.tasks import ArithmeticTask
from sparselayer.tasks.arithmetic import carryless_sum, is_held_out
from sparselayer.train import train


def test_shipped_files_are_small_and_deep_enough():
    weights = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.glob("*.safetensors"))
    assert 0 < weights < 20 * 2**20
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["num_hidden_layers"] >= 24
    assert (DEFAULT_MODEL_DIR / "tokenizer.json").is_file()


def test_task_split_is_disjoint_and_rewards_exact():
    task = ArithmeticTask()
    train_prompts = {e.prompt for e in task.train}
    assert not train_prompts & {e.prompt for e in task.test}
    assert all(is_held_out(*map(int, e.prompt[:-1].split("+"))) for e in task.test)
    ex = task.test[0]
    assert task.reward(ex.answer, ex) == 1.0 and task.reward("0" + ex.answer, ex) == 1.0
    assert task.reward(ex.answer + "x", ex) == 0.0 and task.reward("", ex) == 0.0
    assert carryless_sum(58, 67) == 15 and carryless_sum(123, 456) == 579


def test_base_model_is_partly_competent():
    result = evaluate_path(None, num_examples=500, k=0)
    assert 0.10 <= result["accuracy"] <= 0.60, result


@pytest.mark.slow
def test_default_recipe_on_layer_16_gains_15_points(tmp_path):
    recipe = TrainConfig.from_yaml(DEFAULT_MODEL_DIR / "sparselayer.yaml")
    config = TrainConfig.from_mapping({"layers": "16", "output_dir": str(tmp_path / "run"), "progress": False},
                                      recipe)
    summary = train(config)
    assert summary["final_accuracy"] - summary["base_accuracy"] >= 0.15, summary
