"""The multi-turn rollout loop on a tiny random model and toy environments (turn limit, bounded history, done
handling, group layout), loading --env classes, and episode batches through the trainer: packing, token
weights, and the cached prefix against full forwards (float32, relative 1e-5)."""
from __future__ import annotations

import pytest
import torch
from helpers import full_forward_logprobs

from sparselayer.config import TrainConfig
from sparselayer.errors import ConfigError
from sparselayer.model.layout import load_model
from sparselayer.rollout.episodes import collect_episodes
from sparselayer.rollout.hf import HFRolloutEngine
from sparselayer.tasks import task_from_config
from sparselayer.tasks.chat import PromptRenderer
from sparselayer.tasks.envs import Environment, EnvTask, StepResult, load_environment


class CountdownEnv(Environment):
    """Observation `s<seed>t<turn>:`; ends after `seed % 3 + 1` turns; reward 1 for an action with a digit."""

    suggested_max_completion_length = 3
    steps_after_done = 0

    def reset(self, seed: int) -> str:
        self.seed, self.turn, self.length, self.done = seed, 0, seed % 3 + 1, False
        return f"s{seed}t0:"

    def step(self, action: str) -> StepResult:
        if self.done:
            CountdownEnv.steps_after_done += 1
        self.turn += 1
        self.done = self.turn >= self.length
        reward = float(any(ch.isdigit() for ch in action))
        return StepResult("" if self.done else f"s{self.seed}t{self.turn}:", reward, self.done)


class EndlessEnv(CountdownEnv):
    """Never done: only max_turns ends its episodes."""

    def reset(self, seed: int) -> str:
        out = super().reset(seed)
        self.length = 10**9
        return out


class CallCounter:
    """An engine wrapper that records each generate call's rows and num_generations."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompts, num_generations, *args, **kwargs):
        self.calls.append((len(prompts), num_generations))
        return self.engine.generate(prompts, num_generations, *args, **kwargs)


@pytest.fixture(scope="module")
def engine_and_renderer(tiny_model):
    model, tokenizer = load_model(str(tiny_model), "float32", "cpu")
    return HFRolloutEngine(model, tokenizer), PromptRenderer(tokenizer)


def test_episodes_end_when_done_and_groups_are_laid_out(engine_and_renderer):
    engine, renderer = engine_and_renderer
    counter = CallCounter(engine)
    CountdownEnv.steps_after_done = 0
    task = EnvTask(CountdownEnv, max_turns=5)
    episodes = collect_episodes(counter, task, [0, 1, 2], 2, renderer, 3, seed=1)
    lengths = [sum(s.episode == e for s in episodes.steps) for e in range(6)]
    assert lengths == [1, 1, 2, 2, 3, 3]  # seed % 3 + 1 turns each; two episodes per seed
    assert CountdownEnv.steps_after_done == 0
    assert counter.calls == [(6, 1), (4, 1), (2, 1)]  # one call per turn, live episodes only, one row each
    assert episodes.seeds == [0, 1, 2] and episodes.num_generations == 2
    assert [s.turn for s in episodes.steps if s.episode == 4] == [0, 1, 2]
    assert [s.observation for s in episodes.steps if s.episode == 5] == ["s2t0:", "s2t1:", "s2t2:"]
    for e in range(6):
        assert episodes.returns[e] == sum(s.reward for s in episodes.steps if s.episode == e)
        assert episodes.success[e] == (episodes.returns[e] > 0)  # no success reported: a positive return
    rollouts = episodes.rollouts()
    assert len(rollouts.prompt_ids) == len(episodes.steps) == 12
    assert rollouts.prompt_ids[0] == renderer.render(["s0t0:"])[0]


def test_max_turns_cuts_episodes_and_history_is_bounded(engine_and_renderer):
    engine, renderer = engine_and_renderer
    task = EnvTask(EndlessEnv, max_turns=4, history_length=2)
    episodes = collect_episodes(engine, task, [7], 2, renderer, 3, seed=0)
    assert [s.turn for s in episodes.steps] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert episodes.success == [False, False]  # cut by max_turns: not done
    last = episodes.steps[3]
    first_three = episodes.steps[:3]
    # turn 3 shows turns 1 and 2 (each "observation + action" on its own line), not turn 0
    expected = "".join(f"{s.observation}{s.action}\n" for s in first_three[1:]) + "s7t3:"
    assert last.prompt == expected
    assert episodes.steps[0].prompt == "s7t0:"
    no_history = collect_episodes(engine, EnvTask(EndlessEnv, max_turns=2), [7], 1, renderer, 3, seed=0)
    assert [s.prompt for s in no_history.steps] == ["s7t0:", "s7t1:"]


def test_greedy_episodes_repeat(engine_and_renderer):
    engine, renderer = engine_and_renderer
    task = EnvTask(CountdownEnv, max_turns=3)
    a = collect_episodes(engine, task, [2, 5], 2, renderer, 3, greedy=True)
    b = collect_episodes(engine, task, [2, 5], 2, renderer, 3, greedy=True)
    assert [s.action for s in a.steps] == [s.action for s in b.steps]


def test_load_environment_from_a_file_and_its_errors(tmp_path):
    source = tmp_path / "myenv.py"
    source.write_text("class Echo:\n    def reset(self, seed):\n        return 'x'\n"
                      "    def step(self, action):\n        return ('', 1.0, True)\n\nNOT_AN_ENV = 3\n")
    cls = load_environment(f"{source}:Echo")
    assert cls().reset(0) == "x"
    task = task_from_config(TrainConfig.from_mapping({"env": f"{source}:Echo", "max_turns": 2}).task)
    assert isinstance(task, EnvTask) and task.name == "Echo" and task.max_turns == 2
    for spec, message in ((f"{source}:NOT_AN_ENV", "not a function|not an environment"),
                          (f"{tmp_path}/missing.py:Echo", "file not found"),
                          ("no_such_module_xyz:Env", "not found"), ("nocolon", "expected")):
        with pytest.raises(ConfigError, match=message) as info:
            load_environment(spec)
        assert "\n" not in str(info.value) and str(info.value).startswith("--env ")
    with pytest.raises(ConfigError, match="--env is the task"):
        TrainConfig.from_mapping({"env": f"{source}:Echo", "task": "chain"}).validate()


def test_tuple_results_from_a_plain_class_are_accepted(engine_and_renderer, tmp_path):
    engine, renderer = engine_and_renderer
    source = tmp_path / "tupleenv.py"
    source.write_text("class Once:\n    def reset(self, seed):\n        return 'q'\n"
                      "    def step(self, action):\n        return ('', 0.5, True)\n")
    episodes = collect_episodes(engine, EnvTask(load_environment(f"{source}:Once")), [0, 1], 2, renderer, 2)
    assert episodes.returns == [0.5] * 4 and episodes.success == [True] * 4
    assert episodes.steps[0].prompt == "q"  # a class without `prompt`: the observation alone


def _episode_trainer(model, **extra):
    from sparselayer.trainer import Trainer

    cfg = TrainConfig.from_mapping({"model": str(model), "layers": "2", "prompts_per_step": 3, "num_generations": 4,
                                    "micro_batch_size": 5, "dtype": "float32", "quant": "none", "rollout": "hf",
                                    "advantage": "gigpo", "seed": 3, **extra})
    return Trainer(cfg, task=EnvTask(CountdownEnv, max_turns=3))


def test_episode_batch_packing_weights_and_cached_prefix_match_the_plain_path(tiny_model):
    trainer = _episode_trainer(tiny_model, share_prompts="on", micro_batch_size=64)
    sb = trainer.rollout_batch()
    rows = len(sb.completions)
    assert torch.isclose(sb.weights.sum(), torch.tensor(1.0), atol=1e-6)  # dapo: the mean over all step tokens
    assert sb.advantages.shape == (rows,) and torch.isfinite(sb.advantages).all()
    trainer.attach_prefix(sb)
    assert sb.inputs.shared == 1  # one micro-batch; the first turns of a group share their prompt, found by content
    cached = trainer.policy_logprobs(sb)
    plain = full_forward_logprobs(trainer, sb)
    mask = sb.batch.completion_mask.bool()
    assert torch.isfinite(cached[mask]).all()
    assert float((cached[mask] - plain[mask]).norm() / plain[mask].norm()) <= 1e-5
    micro = trainer.forward.pack(sb.batch, 1, 5)  # steps of a group share no prompt: balanced by tokens alone
    assert sorted(i for mb in micro for i in mb) == list(range(rows)) and max(map(len, micro)) <= 5


def test_gigpo_on_a_single_turn_task_is_refused(tiny_model):
    from helpers import DigitShareTask

    from sparselayer.trainer import Trainer

    cfg = TrainConfig.from_mapping({"model": str(tiny_model), "layers": "2", "prompts_per_step": 2,
                                    "num_generations": 2, "dtype": "float32", "quant": "none", "rollout": "hf",
                                    "advantage": "gigpo", "max_completion_length": 4})
    with pytest.raises(ConfigError, match="multi-turn"):
        Trainer(cfg, task=DigitShareTask()).rollout_batch()
