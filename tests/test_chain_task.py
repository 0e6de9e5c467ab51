"""The built-in multi-turn task `chain`: its transitions (a wrong sum carries on), rewards, seed split, and
a two-step `--task chain --advantage gigpo` training run on a tiny random model."""
from __future__ import annotations

import json

import pytest

from sparselayer.config import TrainConfig
from sparselayer.errors import ConfigError
from sparselayer.tasks import build_task, task_from_config
from sparselayer.tasks.arithmetic import is_held_out
from sparselayer.tasks.envs import HELD_OUT_SEED, ChainEnv, EnvTask, chain_operands


def _play(env: ChainEnv, seed: int, actions: list[str]) -> list:
    env.reset(seed)
    return [env.step(a) for a in actions]


def test_right_sums_succeed_and_the_reward_comes_at_the_end():
    env = ChainEnv(turns=3)
    start, ops = chain_operands(7, 3)
    assert env.reset(7) == f"{start:03d}+{ops[0]:03d}="
    total, results = start, []
    for b in ops:
        results.append(env.step(f"{total + b:04d}"))
        total = (total + b) % 1000
        if not results[-1].done:
            assert results[-1].observation == f"{total:03d}+{ops[len(results)]:03d}="
    assert [r.reward for r in results] == [0.0, 0.0, 1.0]
    assert [r.done for r in results] == [False, False, True] and results[-1].success is True


def test_a_wrong_sum_carries_on_into_the_next_state():
    env = ChainEnv(turns=3)
    start, ops = chain_operands(3, 3)
    env.reset(3)
    wrong = (start + ops[0] + 1) % 1000  # off by one
    first = env.step(str(wrong))
    assert first.observation == f"{wrong:03d}+{ops[1]:03d}="  # the stated sum is the new total
    second = env.step(str(wrong + ops[1]))  # right for the state shown, wrong for the episode's correct path
    third = env.step(str((wrong + ops[1]) % 1000 + ops[2]))
    assert (second.reward, third.reward, third.done, third.success) == (0.0, 0.0, True, False)


def test_per_turn_reward_and_a_non_number_ends_the_episode():
    start, ops = chain_operands(11, 3)
    results = _play(ChainEnv(turns=3, per_turn_reward=True), 11, [str(start + ops[0]), "0"])
    assert results[0].reward == pytest.approx(1 / 3) and results[1].reward == 0.0 and not results[1].done
    env = ChainEnv(turns=3)
    env.reset(11)
    ended = env.step("12x")
    assert ended.done and ended.success is False and ended.reward == 0.0 and ended.observation == ""
    with pytest.raises(RuntimeError, match="reset"):
        env.step("1")


def test_episodes_follow_the_seed_and_held_out_pairs_never_appear_in_training():
    assert chain_operands(5, 4) == chain_operands(5, 4)
    for seed in range(200):
        for held_out, s in ((False, seed), (True, HELD_OUT_SEED + seed)):
            total, ops = chain_operands(s, 3)
            for b in ops:
                assert is_held_out(total, b) == held_out
                total = (total + b) % 1000


def test_chain_task_settings_and_refusals():
    task = task_from_config(TrainConfig.from_mapping({"task": "chain", "chain_turns": 5, "max_turns": 4,
                                                      "history_length": 2}).task)
    assert isinstance(task, EnvTask) and task.max_turns == 4 and task.history_length == 2
    assert task.environment().turns == 5 and task.suggested_max_completion_length == 8
    assert task.train[3].columns["seed"] == 3 and task.test[0].columns["seed"] == HELD_OUT_SEED
    assert isinstance(build_task("chain"), EnvTask)
    with pytest.raises(ConfigError, match="--reward does not apply"):
        TrainConfig.from_mapping({"task": "chain", "reward": ["format"]}).validate()
    with pytest.raises(ConfigError, match="--advantage must be one of"):
        TrainConfig.from_mapping({"advantage": "ppo"}).validate()
    with pytest.raises(ConfigError, match="--gamma"):
        TrainConfig.from_mapping({"gamma": 1.5}).validate()
    with pytest.raises(ConfigError, match="--chain-turns"):
        TrainConfig.from_mapping({"task": "chain", "chain_turns": 0}).validate()


def test_two_step_chain_gigpo_run_on_a_tiny_model(tiny_model, tmp_path):
    from sparselayer.train import train

    cfg = TrainConfig.from_mapping({"model": str(tiny_model), "task": "chain", "advantage": "gigpo", "layers": "2",
                                    "max_steps": 2, "prompts_per_step": 2, "num_generations": 4, "chain_turns": 2,
                                    "num_eval": 6, "dtype": "float32", "quant": "none", "rollout": "hf",
                                    "learning_rate": 1e-3, "output_dir": str(tmp_path / "run"), "progress": False})
    summary = train(cfg)
    assert summary["steps"] == 2 and 0.0 <= summary["final_accuracy"] <= 1.0 and "base_accuracy" in summary
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert 0.0 <= line["rewards/episode_success/mean"] <= 1.0
        assert line["loss"] == line["loss"] and line["grad_norm"] == line["grad_norm"]  # not NaN
    # `sparselayer eval` of the run scores the task it trained on: chain episodes with its own settings
    from sparselayer.export import load_for_eval

    task = load_for_eval(tmp_path / "run")[2]
    assert isinstance(task, EnvTask) and task.name == "chain"


def test_sweep_of_chain_with_gigpo_scores_episode_success(tiny_model, tmp_path, capsys):
    from sparselayer.cli import main

    out = tmp_path / "sweep"
    code = main(["sweep", "--model", str(tiny_model), "--task", "chain", "--advantage", "gigpo", "--layers", "1",
                 "--max-steps", "1", "--prompts-per-step", "2", "--num-generations", "2", "--chain-turns", "2",
                 "--num-eval", "4", "--rollout", "hf", "--dtype", "float32", "--quant", "none",
                 "--output-dir", str(out), "--no-progress"])
    assert code == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert [r["layer"] for r in summary["rows"] if r["kind"] == "layer"] == [1]
    assert 0.0 <= summary["base_score"] <= 1.0 and 0.0 <= summary["full_score"] <= 1.0
    for name in ("sweep.csv", "sweep.png"):
        assert (out / name).stat().st_size > 0
    run = json.loads((out / "runs" / "layer1-seed0" / "summary.json").read_text())
    assert run["final_eval"]["task"] == "chain" and run["final_eval"]["num_examples"] == 4
