"""GRPO with TRL on a small addition model: a plain TRL script.

    python trl_grpo.py --model_name_or_path MODEL_DIR --output_dir runs/trl-grpo

Flags are GRPOConfig's fields (--max_steps 50, --learning_rate 1e-4, ...).
"""
import random
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import HfArgumentParser
from trl import GRPOConfig

from sparselayer.trl import GRPOTrainer


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "local model folder"})
    num_prompts: int = field(default=2000, metadata={"help": "training prompts"})


def addition_rows(n: int, seed: int = 0) -> list[dict]:
    """Prompts like 007+123= with the sum as the answer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        rows.append({"prompt": f"{a:03d}+{b:03d}=", "answer": str(a + b)})
    return rows


def exact_sum(completions, answer, **kwargs):
    """1.0 when the completion is exactly the sum (leading zeros allowed), else 0.0."""
    return [1.0 if c.strip().isdigit() and int(c.strip()) == int(a) else 0.0 for c, a in zip(completions, answer)]


def main():
    parser = HfArgumentParser((ScriptArguments, GRPOConfig))
    parser.set_defaults(learning_rate=1e-3, lr_scheduler_type="constant", per_device_train_batch_size=64,
                        num_generations=8, max_completion_length=8, max_steps=50, logging_steps=1,
                        save_steps=10, bf16=torch.cuda.is_available(), report_to="none")
    script_args, training_args = parser.parse_args_into_dataclasses()
    train_dataset = Dataset.from_list(addition_rows(script_args.num_prompts))
    trainer = GRPOTrainer(
        model=script_args.model_name_or_path,
        reward_funcs=exact_sum,
        args=training_args,
        train_dataset=train_dataset,
        layers="16",
    )
    result = trainer.train()
    print(f"trained {result.global_step} steps, mean loss {result.training_loss:.4f}")
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    main()
