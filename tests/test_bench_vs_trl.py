"""benchmarks/bench_vs_trl.py: its flags, the never-EOS model, and a tiny run of both sides (correctness only:
no timing is asserted)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import load_benchmark

TINY = ["--num-layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2",
        "--layer", "1", "--prompts", "2", "--generations", "4", "--completion-len", "8", "--micro-batch-size", "4",
        "--batches", "1"]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_vs_trl")


def test_defaults_are_the_acceptance_shape(bench):
    cfg, ns = bench.parse_args([])
    assert (cfg.num_layers, cfg.hidden, cfg.rows, cfg.completion_len) == (24, 512, 64, 64)
    assert cfg.side_list() == ["trl", "sparselayer"] and ns.output is None and ns.child is None


def test_flags_round_trip(bench):
    cfg, _ = bench.parse_args([*TINY, "--sides", "trl-no-gc,sparselayer-capture", "--beta", "0.04"])
    again, _ = bench.parse_args(bench.to_args(cfg))
    assert again == cfg and cfg.beta == 0.04 and cfg.side_list() == ["trl-no-gc", "sparselayer-capture"]


@pytest.mark.parametrize("flags, message", [
    (["--sides", "trl,deepspeed"], "--sides takes"),
    (["--layer", "24"], "--layer must be in"),
    (["--micro-batch-size", "5"], "--micro-batch-size must divide"),
    (["--generations", "1"], "--generations must be at least 2"),
    (["--rollout", "sglang"], "--rollout must be one of"),
    (["--loss-type", "sapo"], "--loss-type must be one of"),
    (["--sparselayer-settings", "[1]"], "must be a JSON object"),
    (["--sparselayer-settings", "{fused"], "is not JSON"),
])
def test_bad_flags_are_one_line(bench, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(flags)
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err.splitlines()[-1]


def test_reward_gives_each_completion_its_digit_share(bench):
    assert bench.reward(["p", "q"], ["12ab", ""]) == [0.5, 0.0]


@torch.no_grad()
def test_never_eos_model_never_picks_eos(bench, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg, _ = bench.parse_args(TINY)
    folder = bench.build_model(cfg, tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.randint(3, model.config.vocab_size, (4, 12))
    logits = model(input_ids=ids).logits
    eos = model.config.eos_token_id
    others = torch.cat([logits[..., :eos], logits[..., eos + 1:]], dim=-1)
    assert torch.isfinite(logits).all()
    assert (logits[..., eos] < others.min(dim=-1).values - 50).all()  # probability below e^-50 everywhere


def test_tiny_run_of_both_sides(bench, tmp_path):
    pytest.importorskip("trl")
    cfg, _ = bench.parse_args([*TINY, "--sides", "trl,sparselayer"])
    result = bench.bench(cfg, tmp_path / "out.json")
    rows = {r["side"]: r for r in result["results"]}
    assert set(rows) == {"trl", "sparselayer"}
    for r in rows.values():
        assert r["completion_len_mean"] == 8.0  # every completion max-length on both sides: the same work
        assert r["trainable_params"] == rows["trl"]["trainable_params"] > 0
        assert r["rollout_batch_s"] > 0 and r["peak_rss_bytes"] > 0 and r["sync_bytes"] == 0
        assert all(math.isfinite(r[k]) for k in bench.PHASES)
    assert rows["trl"]["trained_layer_moved"] > 0  # TRL's one trainable layer did train
    assert rows["sparselayer"]["vllm_sync_bytes"] < rows["trl"]["vllm_sync_bytes"]
    assert set(result["ratios"]["sparselayer"]) == {"trl"} and (tmp_path / "out.json").is_file()
    assert "sparselayer / trl" in bench.format_table(result)
