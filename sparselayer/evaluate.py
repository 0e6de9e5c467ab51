"""Held-out accuracy: greedy pass@1, and mean@k / pass@k over k sampled completions per prompt."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .rollout.base import RolloutEngine
from .tasks import Task


def evaluate(engine: RolloutEngine, tokenizer, task: Task, num_examples: int = 500, k: int = 4,
             max_new_tokens: int | None = None, temperature: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """Score the engine's policy on the task's held-out prompts; `accuracy` is greedy pass@1."""
    examples = list(task.test)[:num_examples]
    prompts = [e.prompt for e in examples]
    max_new = max_new_tokens or task.suggested_max_completion_length
    greedy = engine.generate(prompts, 1, max_new, greedy=True, seed=seed)
    greedy_ok = _correct(tokenizer, task, greedy.completion_ids, examples, 1)
    result: dict[str, Any] = {"task": task.name, "num_examples": len(examples),
                              "accuracy": sum(greedy_ok) / len(examples)}
    result["pass@1"] = result["accuracy"]
    if k > 0:
        sampled = engine.generate(prompts, k, max_new, temperature=temperature, seed=seed)
        ok = _correct(tokenizer, task, sampled.completion_ids, examples, k)
        per_prompt = [ok[i * k : (i + 1) * k] for i in range(len(examples))]
        result.update({"k": k, "temperature": temperature,
                       f"mean@{k}": sum(ok) / len(ok),
                       f"pass@{k}": sum(any(g) for g in per_prompt) / len(examples)})
    return result


def _correct(tokenizer, task: Task, completion_ids, examples, n: int) -> list[bool]:
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return [task.is_correct(t, examples[i // n]) for i, t in enumerate(texts)]


def evaluate_path(path: str | Path | None = None, task: Task | None = None, **kwargs: Any) -> dict[str, Any]:
    """Evaluate a model folder, a run directory (its latest checkpoint merged), or the embedded default (None)."""
    from .export import load_for_eval
    from .rollout.hf import HFRolloutEngine

    model, tokenizer, run_task, source = load_for_eval(path)
    task = task or run_task
    result = evaluate(HFRolloutEngine(model, tokenizer), tokenizer, task, **kwargs)
    return {"model": source, **result}
