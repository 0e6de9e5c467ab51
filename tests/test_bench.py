"""The step benchmark runs both variants on a tiny shape and reports consistent figures."""
from __future__ import annotations

import json

from sparselayer.bench.config import StepBenchConfig
from sparselayer.bench.step import bench_step, format_table
from sparselayer.cli import main

TINY = dict(num_layers=4, hidden=64, intermediate=128, vocab=512, heads=4, kv_heads=2, layer=2, prompts=2,
            generations=4, prompt_len=8, completion_len=8, steps=1)


def test_bench_step_compares_full_and_sparse(tmp_path):
    result = bench_step(StepBenchConfig(**TINY), tmp_path / "step.json")
    full, sparse = result["results"]
    assert (full["variant"], sparse["variant"]) == ("full", "sparse")
    assert full["trainable_params"] > sparse["trainable_params"] > 0
    for row in (full, sparse):
        assert row["step_time_s"] > 0 and row["peak_mem_bytes"] > 0 and row["tokens_per_s"] > 0
        phases = sum(row[k] for k in ("rollout_s", "reward_s", "logprob_s", "train_s", "push_s"))
        assert abs(phases - row["step_time_s"]) < 1e-9
    assert result["speedup"] == full["step_time_s"] / sparse["step_time_s"]
    assert json.loads((tmp_path / "step.json").read_text())["results"] == result["results"]
    assert "speedup" in format_table(result)


def test_bench_cli_rejects_bad_layer(capsys):
    assert main(["bench", "step", "--num-layers", "4", "--layer", "9"]) == 2
    assert "within the model's layers" in capsys.readouterr().err


def test_bench_step_one_variant(tmp_path):
    """--variants sparse (the 8B preset's default: full-parameter 8B fits no single GPU) runs it alone."""
    result = bench_step(StepBenchConfig(**TINY, variants="sparse"), tmp_path / "step.json")
    assert [r["variant"] for r in result["results"]] == ["sparse"]
    assert result["speedup"] is None and result["peak_mem_ratio"] is None
    assert result["results"][0]["peak_mem_bytes"] > 0 and result["device_name"] == "cpu"
    assert "speedup" not in format_table(result)


def test_bench_cli_rejects_bad_variants(capsys, tmp_path):
    assert main(["bench", "step", "--variants", "fast", "--output", str(tmp_path / "x.json")]) == 2
    assert "--variants takes full, sparse, sparse-no-share" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_bench_step_sparse_without_shared_prompts(tmp_path):
    result = bench_step(StepBenchConfig(**TINY, variants="sparse-no-share,sparse"), tmp_path / "step.json")
    assert [r["variant"] for r in result["results"]] == ["sparse", "sparse-no-share"]
    no_share, share = result["results"][1], result["results"][0]
    assert result["shared_prompts_speedup"] == no_share["step_time_s"] / share["step_time_s"]
    assert no_share["trainable_params"] == share["trainable_params"]
    assert "shared prompts" in format_table(result)


def test_full_variant_is_the_same_step_configured_as_a_standard_trainer(tmp_path):
    """The baseline is Trainer.step configured: every parameter trained, a separate frozen reference model,
    a separate old-policy pass, full forwards, the plain head and stock modules; the sparse variant is not."""
    import torch

    from sparselayer.bench.step import RandomRewardTask, SyntheticEngine, build_random_model, variant_config
    from sparselayer.model.forward import CachedPrefixForward, FullForward
    from sparselayer.trainer import Trainer

    cfg = StepBenchConfig(**TINY)
    model = build_random_model(cfg, tmp_path / "model")
    engine = SyntheticEngine(cfg.vocab, cfg.prompt_len, cfg.completion_len)
    full = Trainer(variant_config(cfg, model, "full"), task=RandomRewardTask(), engine=engine)
    assert isinstance(full.forward, FullForward) and isinstance(full.reference, torch.nn.Module)
    assert full.config.rl.old_logp_pass and not full.fused and full.quant == "none"
    assert all(p.requires_grad for p in full.model.parameters())
    assert not any(hasattr(m, "_sparselayer_kernels") for m in full.model.modules())
    sparse = Trainer(variant_config(cfg, model, "sparse"), task=RandomRewardTask(), engine=engine)
    assert isinstance(sparse.forward, CachedPrefixForward) and isinstance(sparse.reference, dict)
    assert sparse.fused and not sparse.config.rl.old_logp_pass
    assert any(hasattr(m, "_sparselayer_kernels") for m in sparse.model.modules())
    metrics = full.step()
    assert metrics["kl"] >= 0 and torch.isfinite(torch.tensor(metrics["loss"]))


def test_bench_boolean_settings_parse_as_switches():
    from sparselayer.bench.config import PRESETS
    from sparselayer.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["bench", "step", "--gradient-checkpointing"]).gradient_checkpointing is True
    assert parse(["bench", "step", "--no-gradient-checkpointing"]).gradient_checkpointing is False
    assert not hasattr(parse(["bench", "step"]), "gradient_checkpointing")  # unset: the preset's, else False
    assert PRESETS["qwen3-8b"]["gradient_checkpointing"] is True
