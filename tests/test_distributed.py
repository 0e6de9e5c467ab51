"""Data-parallel training through torchrun (gloo, 2 CPU processes) against a single process.

Run as a script, this file is the torchrun worker of the equivalence test; run by pytest, it launches it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from sparselayer.batch import Rollouts
from sparselayer.bench.step import RandomRewardTask
from sparselayer.config import TrainConfig
from sparselayer.distributed import World, check_tensor_parallel, describe_failures, vllm_launcher_kwargs
from sparselayer.errors import ConfigError
from sparselayer.objective import BatchTotals, token_weights
from sparselayer.rollout.base import RolloutEngine
from sparselayer.runs import RunDir

STEPS = 3
# the equivalence settings, one entry per loss type: dapo's batch token count and grpo's sequence count are
# the global normalisers; batch reward scaling gathers the rewards; two passes all-reduce twice per step
CASES = {
    "dapo": {"loss_type": "dapo", "scale_rewards": "batch", "num_iterations": 2, "beta": 0.04},
    "grpo": {"loss_type": "grpo", "scale_rewards": "group", "num_iterations": 1, "beta": 0.0},
}


class PromptKeyedEngine(RolloutEngine):
    """Completions that depend only on the prompt and the generation index (not on the seed or on which
    rank asks), so two ranks and one process get the same rollouts; lengths vary, so normalisers matter."""

    def generate(self, prompts: Sequence, num_generations: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, greedy: bool = False) -> Rollouts:
        prompt_rows, completions = [], []
        for ids in prompts:
            for j in range(num_generations):
                g = torch.Generator().manual_seed(hash(tuple(ids)) % 2**31 * 31 + j)
                length = int(torch.randint(2, max_new_tokens + 1, (1,), generator=g))
                completions.append(torch.randint(5, 40, (length,), generator=g).tolist())
                prompt_rows.append(list(ids))
        return Rollouts(prompt_ids=prompt_rows, completion_ids=completions)

    def update_weights(self, named_tensors) -> int:
        return 0


def case_config(model: str, case: str) -> TrainConfig:
    return TrainConfig.from_mapping({"model": model, "layers": "1", "prompts_per_step": 4, "num_generations": 4,
                                     "micro_batch_size": 3, "learning_rate": 0.01, "max_completion_length": 10,
                                     "seed": 3, "device": "cpu", "dtype": "float32", "quant": "none",
                                     **CASES[case]})


def train_case(model: str, case: str) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """STEPS steps of one case; under torchrun, checks after every step that all ranks hold the same weights."""
    from sparselayer.trainer import Trainer

    torch.manual_seed(0)
    trainer = Trainer(case_config(model, case), task=RandomRewardTask(), engine=PromptKeyedEngine())
    lines = []
    for _ in range(STEPS):
        lines.append(trainer.step())
        if trainer.world.size > 1:
            _check_identical(trainer.trained_state())
    return {k: v.clone() for k, v in trainer.trained_state().items()}, lines


def _check_identical(state: dict[str, torch.Tensor]) -> None:
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in state.values()])
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, flat)
    assert all(torch.equal(everyone[0], t) for t in everyone), "ranks hold different weights"


def worker(model: str, out: str) -> None:
    """The torchrun worker: every case; rank 0 writes the weights and metrics lines."""
    from safetensors.torch import save_file

    results = {}
    for case in CASES:
        state, lines = train_case(model, case)
        grad_bytes = sum(t.numel() * 4 for t in state.values())  # float32 gradients of the trained layer
        results[case] = {"lines": lines, "grad_bytes": grad_bytes}
        if int(os.environ["RANK"]) == 0:
            save_file({k: v.contiguous() for k, v in state.items()}, f"{out}/{case}.safetensors")
    if int(os.environ["RANK"]) == 0:
        Path(out, "metrics.json").write_text(json.dumps(results))


def _torchrun(*args: str, env: dict[str, str] | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "SPARSELAYER_AUTO_ROLLOUT": "hf", **extra}


@pytest.mark.slow
def test_two_ranks_match_one_process(tiny_model, tmp_path):
    """Same rollouts, global batch, seed and settings: 2 ranks reach the single process's weights (1e-5
    relative) for dapo and grpo, every rank holds the same weights after every step, and the metrics line
    says world_size 2 and the trained layer's gradient bytes per all-reduce."""
    done = subprocess.run(_torchrun(__file__, str(tiny_model), str(tmp_path)), env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "metrics.json").read_text())
    for case, settings in CASES.items():
        single, single_lines = train_case(str(tiny_model), case)
        both = load_file(str(tmp_path / f"{case}.safetensors"))
        assert both.keys() == single.keys()
        for name in single:
            moved = (single[name] - _initial(tiny_model, name)).abs().max()
            assert moved > 1e-4, f"{case}: {name} did not train"
            diff = float((both[name] - single[name]).norm() / single[name].norm())  # the suite's relative error
            assert diff <= 1e-5, f"{case}: {name} differs by {diff:.2e} relative"
        lines = results[case]["lines"]
        assert [line["world_size"] for line in lines] == [2] * STEPS
        per_pass = results[case]["grad_bytes"]
        assert [line["allreduce_bytes"] for line in lines] == [per_pass * settings["num_iterations"]] * STEPS
        for line, ref in zip(lines, single_lines):  # global values, as one process reports them
            for key in ("reward_mean", "reward_std", "accuracy", "completion_length", "loss", "kl", "grad_norm"):
                assert line[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (case, key)
        assert "world_size" not in single_lines[0]  # the single-process line is as before


def _initial(model: Path, name: str) -> torch.Tensor:
    return load_file(str(model / "model.safetensors"))[name]


def _train_cmd(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sparselayer", "train", "--nproc-per-node", "2", "--model", str(model),
            "--layer", "1", "--max-steps", "6", "--save-steps", "1", "--prompts-per-step", "4",
            "--num-generations", "4", "--micro-batch-size", "5", "--learning-rate", "0.01", "--beta", "0.04",
            "--max-completion-length", "12", "--seed", "5", "--num-eval", "4", "--no-progress",
            "--output-dir", str(out), *extra]


def _rank_pid(tag: str, rank: int) -> int | None:
    """The pid of the worker process of `rank` among those started with SPARSELAYER_TEST_TAG=tag."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SPARSELAYER_TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_killed_rank_stops_the_job_and_resume_matches(tiny_model, tmp_path):
    """SIGKILL rank 1 mid-run: the job ends non-zero within 60 s naming rank 1; --resume with 2 processes
    finishes the run with the weights of an uninterrupted 2-process run."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(_train_cmd(tiny_model, straight), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    tag = str(tmp_path)
    proc = subprocess.Popen(_train_cmd(tiny_model, killed), env=_env(SPARSELAYER_TEST_TAG=tag),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    pid = _rank_pid(tag, 1)
    assert proc.poll() is None and pid is not None, "the run finished before rank 1 could be killed"
    os.kill(pid, signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job did not stop within 60 s of rank 1's death")
    assert proc.returncode != 0
    assert _error_lines(err)[-1].startswith("sparselayer: error: rank 1 killed by SIGKILL"), err[-2000:]
    assert RunDir(killed).checkpoint_steps()[-1] < 6

    done = subprocess.run(_train_cmd(tiny_model, killed, "--resume"), env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(str(RunDir(straight).latest_checkpoint() / "trained.safetensors"))
    b = load_file(str(RunDir(killed).latest_checkpoint() / "trained.safetensors"))
    assert RunDir(killed).latest_checkpoint().name == "step-6"
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-6, name
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 7)), "metrics.jsonl (rank 0) holds each step exactly once"


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("sparselayer: error:")]


RAISING_REWARD = """
import os

def reward(completions, **kwargs):
    if os.environ.get("RANK") == "1":
        raise ValueError("rank one refuses")
    return [0.0 for _ in completions]
"""


@pytest.mark.slow
def test_a_raising_rank_stops_the_job_with_one_line(tiny_model, tmp_path):
    """A reward function that raises on rank 1 only: the job ends non-zero (no hang), rank 1 prints its one
    line naming itself and the cause, and the launcher's line names rank 1."""
    (tmp_path / "rewards.py").write_text(RAISING_REWARD)
    cmd = _train_cmd(tiny_model, tmp_path / "run", "--reward", f"{tmp_path / 'rewards.py'}:reward")
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    lines = _error_lines(done.stderr)
    assert any(line.startswith("sparselayer: error: rank 1: ") and "rank one refuses" in line for line in lines), \
        done.stderr[-2000:]
    assert lines[-1].startswith("sparselayer: error: rank 1 exited with status 2"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_shard_keeps_whole_groups_in_rank_order():
    """Prompts split contiguously, earlier ranks taking the remainder: every prompt exactly once."""
    for n, size in [(16, 2), (7, 3), (3, 3), (5, 4)]:
        parts = [list(World(r, size).shard(n)) for r in range(size)]
        assert [i for p in parts for i in p] == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_engine_groups_follow_vllm_numbering():
    """--vllm-tensor-parallel-size 2 on 4 ranks: ranks 0-1 share engine 0 (vLLM's DP rank = RANK // tp)."""
    assert [World(r, 4).engine_group(2).rank for r in range(4)] == [0, 0, 1, 1]
    assert [World(r, 4).within_engine_group(2).rank for r in range(4)] == [0, 1, 0, 1]
    assert World(3, 4).engine_group(1) == World(3, 4)
    assert vllm_launcher_kwargs(2, World(0, 4)) == {"tensor_parallel_size": 2, "data_parallel_size": 2,
                                                   "distributed_executor_backend": "external_launcher"}


def test_training_share_splits_an_engines_batch_in_whole_groups():
    from sparselayer.trainer import Trainer

    n = 2
    rollouts = Rollouts(prompt_ids=[[i] for i in range(3) for _ in range(n)],
                        completion_ids=[[i, j] for i in range(3) for j in range(n)],
                        sampling_logprobs=[[0.0, float(i)] for i in range(3) for _ in range(n)])
    parts, config = [], SimpleNamespace(rl=SimpleNamespace(num_generations=n))
    for rank in range(2):
        fake = SimpleNamespace(tp=2, world=World(rank, 2), config=config)
        parts.append(Trainer.training_share(fake, ["a", "b", "c"], rollouts))
    assert [p[0] for p in parts] == [["a", "b"], ["c"]]
    assert parts[0][1].completion_ids == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert parts[1][1].prompt_ids == [[2], [2]] and parts[1][1].sampling_logprobs == [[0.0, 2.0]] * 2


def test_tensor_parallel_rollouts_are_refused_on_cpu(tiny_model, tmp_path, capsys):
    from sparselayer.cli import main

    with pytest.raises(ConfigError, match="needs GPUs"):
        check_tensor_parallel(2, "cpu", "vllm", World(0, 2))
    with pytest.raises(ConfigError, match="must divide"):
        check_tensor_parallel(2, "cuda", "vllm", World(0, 3))
    check_tensor_parallel(1, "cpu", "hf", World())  # the default: nothing to check
    code = main(["train", "--model", str(tiny_model), "--layer", "1", "--vllm-tensor-parallel-size", "2",
                 "--max-steps", "1", "--no-progress", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("sparselayer: error: --vllm-tensor-parallel-size 2 "
                                                             "needs GPUs"), err


def test_global_totals_reproduce_the_single_batch_weights():
    """Each rank's token weights with the global totals are the rows of the whole batch's weights."""
    torch.manual_seed(0)
    mask = (torch.rand(8, 6) > 0.3).float()
    halves = [list(range(4)), list(range(4, 8))]
    for loss_type in ("grpo", "dapo", "dr_grpo", "cispo"):
        whole = token_weights(mask, loss_type, 6, [list(range(8))])
        totals = BatchTotals(8, int(mask.sum()), 2)
        parts = [token_weights(mask[rows], loss_type, 6, [list(range(4))], totals) for rows in halves]
        assert torch.allclose(torch.cat(parts), whole, rtol=1e-6), loss_type
    assert torch.equal(token_weights(mask, "dapo", 6, [list(range(8))], None),
                       mask / mask.sum().clamp(min=1))  # no totals: exactly as before


def test_failure_line_names_the_killed_rank_first():
    class Failure:
        def __init__(self, exitcode: int, timestamp: int):
            self.exitcode, self.timestamp = exitcode, timestamp

        def signal_name(self) -> str:
            return signal.Signals(-self.exitcode).name

    line = describe_failures({0: Failure(2, 5), 1: Failure(-9, 6)})
    assert line.startswith("rank 1 killed by SIGKILL, which stopped the job (rank 0 exited with status 2)")
    line = describe_failures({0: Failure(-15, 5), 1: Failure(-9, 6), 2: Failure(2, 4)})
    assert line.startswith("rank 1 killed by SIGKILL, which stopped the job (rank 2 exited with status 2; "
                           "rank 0 killed by SIGTERM)")
    assert describe_failures({3: Failure(2, 5), 0: Failure(-15, 4)}).startswith("rank 3 exited with status 2")
    assert "\n" not in line and "--resume" in line


def test_nproc_per_node_is_not_a_setting():
    from sparselayer.cli import _without_nproc, build_parser, resolve_train_config

    argv = ["train", "--nproc-per-node", "2", "--layer", "1", "--nproc-per-node=3", "--max-steps", "2"]
    assert _without_nproc(argv) == ["train", "--layer", "1", "--max-steps", "2"]
    args = build_parser().parse_args(argv)
    args.argv = argv
    assert resolve_train_config(args).run.max_steps == 2


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
