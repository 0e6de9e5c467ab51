"""End to end on tiny random models: metrics lines, checkpoint contents, export and eval round trips."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from helpers import DigitShareTask
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sparselayer.cli import main
from sparselayer.config import TrainConfig
from sparselayer.runs import RunDir
from sparselayer.train import train

METRIC_KEYS = {"step", "reward_mean", "reward_std", "accuracy", "loss", "kl", "clip_ratio", "step_time_s",
               "rollout_s", "reward_s", "logprob_s", "train_s", "push_s", "tokens_per_s", "peak_mem_bytes",
               "shared_micro_batches"}
PHASES = ("rollout_s", "reward_s", "logprob_s", "train_s", "push_s")


def _config(model, out, **extra):
    base = {"model": str(model), "layers": "-2", "max_steps": 3, "prompts_per_step": 4, "num_generations": 4,
            "micro_batch_size": 6, "learning_rate": 0.01, "beta": 0.04, "num_iterations": 2, "save_steps": 2,
            "max_completion_length": 10, "num_eval": 8, "output_dir": str(out), "progress": False}
    return TrainConfig.from_mapping({**base, **extra})


def test_run_directory_metrics_and_checkpoint(tiny_model, tmp_path):
    out = tmp_path / "run"
    summary = train(_config(tiny_model, out), task=DigitShareTask())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    for r in lines:
        assert METRIC_KEYS <= r.keys()
        assert r["step_time_s"] == pytest.approx(sum(r[p] for p in PHASES), rel=1e-9)
        assert r["logprob_s"] > 0 and r["peak_mem_bytes"] > 0 and r["tokens_per_s"] > 0
        assert r["shared_micro_batches"] == 0  # --share-prompts auto: too little work to share on this model
        assert all(isinstance(r[k], (int, float)) and r[k] == r[k] for k in METRIC_KEYS)
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update
    assert lines[-1]["kl"] > 0
    run = RunDir(out)
    assert run.checkpoint_steps() == [2, 3]
    tensors = load_file(str(run.latest_checkpoint() / "trained.safetensors"))
    assert tensors and all(k.startswith("model.layers.2.") for k in tensors)  # -2 of 4 layers
    assert summary["steps"] == 3 and "base_accuracy" in summary and "final_accuracy" in summary
    assert (out / "config.yaml").is_file() and (out / "summary.json").is_file()


def test_export_merges_trained_layer_and_eval_reads_run(tiny_model, tmp_path, capsys):
    out, exported = tmp_path / "run", tmp_path / "exported"
    train(_config(tiny_model, out, eval_at_start=False, eval_at_end=False), task=DigitShareTask())
    assert main(["export", str(out), "--output", str(exported)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, local_files_only=True).state_dict()
    trained = load_file(str(RunDir(out).latest_checkpoint() / "trained.safetensors"))
    for name, tensor in merged.items():
        expected = trained.get(name, base[name])
        assert torch.equal(tensor, expected), name
    assert any(not torch.equal(trained[n], base[n]) for n in trained), "training changed the layer"
    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert main(["eval", str(out), "--output", str(report), "--k", "2", "--num-eval", "6"]) == 0
    result = json.loads(report.read_text())
    assert 0.0 <= result["accuracy"] <= 1.0 and "mean@2" in result and result["num_examples"] == 6
    assert json.loads(capsys.readouterr().out) == result


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_other_families_train(tmp_path, family):
    model = make_tiny_model(tmp_path / family, num_layers=3, model_type=family)
    summary = train(_config(model, tmp_path / "run", layers="1", max_steps=1, eval_at_start=False,
                            eval_at_end=False), task=DigitShareTask())
    assert summary["steps"] == 1 and summary["layers"] == "layer1"


def test_full_parameter_baseline_trains_every_parameter(tiny_model, tmp_path):
    out = tmp_path / "all"
    train(_config(tiny_model, out, layers="all", max_steps=1, eval_at_start=False, eval_at_end=False),
          task=DigitShareTask())
    tensors = load_file(str(RunDir(out).latest_checkpoint() / "trained.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model, local_files_only=True)
    assert set(tensors) == {n for n, _ in base.named_parameters()}
