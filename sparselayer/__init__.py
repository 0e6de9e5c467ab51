"""sparselayer: GRPO post-training of a language model by training one transformer layer.

The Python API other training stacks call (the CLI is a thin layer over it):

    from sparselayer import TrainConfig, train
    summary = train(TrainConfig.from_mapping({"layers": "16", "max_steps": 100}))
"""
from .batch import Batch, Rollouts, StepBatch, collate
from .config import TrainConfig
from .errors import ConfigError, DataError, ModelError, RewardError, RunError, SparseLayerError
from .evaluate import evaluate, evaluate_path
from .export import export_run, load_run
from .kernels.loss_module import FusedLMHeadGRPOLoss
from .rollout.base import RolloutEngine
from .rollout.hf import HFRolloutEngine
from .tasks import ArithmeticTask, Example, Task, build_task
from .train import train
from .trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "ArithmeticTask", "Batch", "ConfigError", "DataError", "Example", "FusedLMHeadGRPOLoss", "HFRolloutEngine",
    "ModelError",
    "RewardError", "RolloutEngine", "Rollouts", "RunError", "SparseLayerError", "StepBatch", "Task", "TrainConfig",
    "Trainer",
    "build_task", "collate", "evaluate", "evaluate_path", "export_run", "load_run", "train",
]


def __getattr__(name: str):
    """`sparselayer.trl` (TRL's front door) loads on first use: `import sparselayer` imports neither it nor TRL."""
    if name == "trl":
        import importlib

        return importlib.import_module(".trl", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
