"""The multi-turn rollout loop: a group of environments per seed, played turn by turn through any engine.

Step-wise (as verl-agent trains agents): every turn of every episode is its own training sample, with its
own prompt (the environment's `prompt` of a bounded history and the current observation) and completion
(the action). Each turn is one `RolloutEngine.generate` call for all live environments, one completion
per row; an episode ends when its environment says done or after `max_turns` turns. The result holds the
samples as Rollouts (one row per step, episode-major, turns in order) and the episode structure GiGPO
needs: which episode and group each step belongs to, its turn, its observation and reward.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..batch import Rollouts
from ..tasks.chat import PromptRenderer
from ..tasks.envs import EnvTask, step_result, turn_prompt
from .base import RolloutEngine


@dataclass
class EpisodeStep:
    """One turn of one episode: a training sample (prompt ids, completion ids) and where it belongs."""

    episode: int  # episode number in the batch: group g holds episodes g*n .. g*n+n-1
    turn: int  # 0-based
    observation: str  # what the environment showed (the GiGPO anchor state)
    prompt: Any  # the prompt built from the history and the observation (text or a conversation)
    action: str  # the decoded completion
    reward: float
    prompt_ids: list[int]
    completion_ids: list[int]
    sampling_logprobs: list[float] | None = None


@dataclass
class Episodes:
    """The steps of a batch of episodes (episode-major, turns in order) and each episode's outcome."""

    steps: list[EpisodeStep]
    num_generations: int  # episodes per seed: the GRPO group
    seeds: list[int]  # one per group
    returns: list[float] = field(default_factory=list)  # per episode, the undiscounted sum of its rewards
    success: list[bool] = field(default_factory=list)  # per episode

    def rollouts(self) -> EpisodeRollouts:
        """The steps as one rollout batch (one row per step; sampling log-probs when every step has them)."""
        logprobs = [s.sampling_logprobs for s in self.steps]
        return EpisodeRollouts([s.prompt_ids for s in self.steps], [s.completion_ids for s in self.steps],
                               None if any(lp is None for lp in logprobs) else logprobs, episodes=self)


@dataclass
class EpisodeRollouts(Rollouts):
    """Rollouts whose rows are the steps of `episodes` (not GRPO groups of num_generations rows per prompt)."""

    episodes: Episodes | None = field(default=None, compare=False)


@dataclass
class _Live:
    """An episode being played."""

    env: Any  # an Environment, or any class with reset and step
    observation: str
    history: list[tuple[str, str]] = field(default_factory=list)
    done: bool = False
    success: bool | None = None


def collect_episodes(engine: RolloutEngine, task: EnvTask, seeds: Sequence[int], num_generations: int,
                     renderer: PromptRenderer, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                     seed: int = 0, greedy: bool = False) -> Episodes:
    """Play `num_generations` episodes of each seed for at most `task.max_turns` turns; `seed` seeds sampling
    (turn t samples with seed + t), `renderer` turns prompts into the ids every engine samples from."""
    live = []
    for s in seeds:
        for _ in range(num_generations):
            env = task.environment()
            live.append(_Live(env, str(env.reset(s))))
    per_episode: list[list[EpisodeStep]] = [[] for _ in live]
    for turn in range(task.max_turns):
        playing = [i for i, ep in enumerate(live) if not ep.done]
        if not playing:
            break
        prompts = [turn_prompt(live[i].env, _window(live[i].history, task.history_length), live[i].observation)
                   for i in playing]
        ids = renderer.render(prompts, [f"episode {seeds[i // num_generations]}, turn {turn}" for i in playing])
        out = engine.generate(ids, 1, max_new_tokens, temperature, top_p, seed=seed + turn, greedy=greedy)
        actions = renderer.tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
        for row, i in enumerate(playing):
            ep = live[i]
            result = step_result(ep.env.step(actions[row]))
            logprobs = None if out.sampling_logprobs is None else out.sampling_logprobs[row]
            per_episode[i].append(EpisodeStep(i, turn, ep.observation, prompts[row], actions[row],
                                              float(result.reward), out.prompt_ids[row], out.completion_ids[row],
                                              logprobs))
            ep.history.append((ep.observation, actions[row]))
            ep.observation, ep.done, ep.success = result.observation, result.done, result.success
    returns = [sum(s.reward for s in steps) for steps in per_episode]
    success = [bool(ep.done and (ep.success if ep.success is not None else r > 0)) for ep, r in zip(live, returns)]
    return Episodes([s for steps in per_episode for s in steps], num_generations, list(seeds), returns, success)


def _window(history: list[tuple[str, str]], length: int) -> list[tuple[str, str]]:
    """The last `length` (observation, action) pairs (none for length 0)."""
    return history[-length:] if length > 0 else []
