"""Held-out accuracy: greedy pass@1, and mean@k / pass@k over k sampled completions per prompt; for a
multi-turn task the same figures over held-out episodes, an episode counting when it succeeds."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from .distributed import all_reduce_sum, world
from .rollout.base import RolloutEngine
from .rollout.episodes import collect_episodes
from .tasks import Task
from .tasks.chat import PromptRenderer
from .tasks.envs import env_task_of


def evaluate(engine: RolloutEngine, tokenizer, task: Task, num_examples: int = 500, k: int = 4,
             max_new_tokens: int | None = None, temperature: float = 1.0, seed: int = 0,
             renderer: PromptRenderer | None = None) -> dict[str, Any]:
    """Score the engine's policy on the task's held-out prompts; `accuracy` is greedy pass@1.

    `renderer` turns prompts into token ids as training did (the trainer's: same chat template, system
    prompt and template variables); unset: `tokenizer`'s own chat template renders conversations.
    Under torchrun every rank scores its contiguous share of the prompts and the counts are summed, so
    every rank returns the whole set's figures.
    """
    everyone = list(task.test)[:num_examples]
    examples = [everyone[i] for i in world().shard(len(everyone))]
    renderer = renderer or PromptRenderer(tokenizer)
    max_new = max_new_tokens or task.suggested_max_completion_length
    if env_task_of(task) is not None:  # multi-turn: each example names a held-out episode
        scored = _episodes_scorer(engine, task, renderer, examples, max_new)
    else:
        scored = functools.partial(_scored, engine, tokenizer, task, renderer.token_ids(examples), examples,
                                   max_new=max_new)
    greedy_ok = scored(1, greedy=True, seed=seed)
    (correct,) = all_reduce_sum([sum(greedy_ok)])
    result: dict[str, Any] = {"task": task.name, "num_examples": len(everyone),
                              "accuracy": correct / len(everyone)}
    result["pass@1"] = result["accuracy"]
    if k > 0:
        ok = scored(k, temperature=temperature, seed=seed)
        per_prompt = [ok[i * k : (i + 1) * k] for i in range(len(examples))]
        hits, solved = all_reduce_sum([sum(ok), sum(any(g) for g in per_prompt)])
        result.update({"k": k, "temperature": temperature,
                       f"mean@{k}": hits / (len(everyone) * k),
                       f"pass@{k}": solved / len(everyone)})
    return result


def _scored(engine: RolloutEngine, tokenizer, task: Task, prompts, examples, n: int, max_new: int,
            **sampling: Any) -> list[bool]:
    """Whether each of n completions per prompt is correct (nothing to sample for a rank without prompts)."""
    if not examples:
        return []
    rollouts = engine.generate(prompts, n, max_new, **sampling)
    return _correct(tokenizer, task, rollouts.completion_ids, examples, n)


def _episodes_scorer(engine: RolloutEngine, task: Task, renderer: PromptRenderer, examples, max_new: int):
    """A scorer like `_scored` for a multi-turn task: whether each of n episodes per held-out seed succeeds."""
    seeds = [e.columns["seed"] for e in examples]

    def scored(n: int, greedy: bool = False, temperature: float = 1.0, seed: int = 0) -> list[bool]:
        if not seeds:
            return []
        return collect_episodes(engine, env_task_of(task), seeds, n, renderer, max_new, temperature,
                                seed=seed, greedy=greedy).success
    return scored


def _correct(tokenizer, task: Task, completion_ids, examples, n: int) -> list[bool]:
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return [task.is_correct(t, examples[i // n]) for i, t in enumerate(texts)]


def evaluate_path(path: str | Path | None = None, task: Task | None = None, **kwargs: Any) -> dict[str, Any]:
    """Evaluate a model folder, a run directory (its latest checkpoint merged), or the embedded default (None)."""
    from .export import load_for_eval
    from .rollout.hf import HFRolloutEngine

    model, tokenizer, run_task, source, renderer = load_for_eval(path)
    task = task or run_task
    result = evaluate(HFRolloutEngine(model, tokenizer), tokenizer, task, renderer=renderer, **kwargs)
    return {"model": source, **result}
