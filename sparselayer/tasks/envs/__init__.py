"""Multi-turn tasks: the environment interface, the built-in `chain` environment, and the task that plays an
environment's episodes (see docs/environments.md)."""
from .base import (
    HELD_OUT_SEED,
    EnvFactory,
    Environment,
    StepResult,
    is_held_out_seed,
    load_environment,
    step_result,
    text_prompt,
    turn_prompt,
)
from .chain import ChainEnv, chain_operands
from .task import EnvTask, env_task_of, episode_example

__all__ = ["HELD_OUT_SEED", "ChainEnv", "EnvFactory", "EnvTask", "Environment", "StepResult", "chain_operands",
           "env_task_of", "episode_example", "is_held_out_seed", "load_environment", "step_result", "text_prompt",
           "turn_prompt"]
