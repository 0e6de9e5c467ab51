"""Step benchmark: the full-parameter GRPO step as a standard trainer runs it, against the layer-sparse
step, on the same random model, batch and seed. Both are the same `Trainer.step`, configured
differently: the baseline trains every parameter with AdamW, keeps a separate frozen reference
model, runs a separate old-policy pass when num_iterations > 1, runs the whole model in every pass
(no prefix cache, no shared prompts) and uses stock transformers modules and the plain LM head.

Both variants get identical synthetic rollouts (fixed-length random completions with random
rewards), so the figures isolate the training-side work in which they differ; generation is the
same engine for both. Each variant runs in its own subprocess so peak memory is its own.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..batch import Rollouts
from ..config import QUANT_MODES, TrainConfig
from ..errors import ConfigError
from ..memory import peak_bytes, reset_peak
from ..metrics import PHASES
from ..rollout.base import RolloutEngine
from ..tasks.base import Example, Task
from .config import StepBenchConfig, parse_variants


class SyntheticEngine(RolloutEngine):
    """Fixed-length random prompts and completions: the same tokens for every variant (seeded)."""

    def __init__(self, vocab: int, prompt_len: int, completion_len: int):
        self.vocab, self.prompt_len, self.completion_len = vocab, prompt_len, completion_len

    def generate(self, prompts: Sequence[str], num_generations: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, greedy: bool = False) -> Rollouts:
        g = torch.Generator().manual_seed(seed)
        rows = len(prompts) * num_generations
        p = torch.randint(3, self.vocab, (len(prompts), self.prompt_len), generator=g)
        p = p.repeat_interleave(num_generations, 0)
        c = torch.randint(3, self.vocab, (rows, self.completion_len), generator=g)
        return Rollouts(prompt_ids=p.tolist(), completion_ids=c.tolist())

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        return 0


class RandomRewardTask(Task):
    """Rewards from a deterministic function of the completion text, so groups carry signal."""

    name = "random-reward"
    suggested_max_completion_length = 128

    def __init__(self, n: int = 64):
        self._train = [Example(f"p{i}", "0") for i in range(n)]

    @property
    def train(self):
        return self._train

    @property
    def test(self):
        return self._train[:1]

    def is_correct(self, completion: str, example: Example) -> bool:
        return self.reward(completion, example) > 0.5

    def reward(self, completion: str, example: Example) -> float:
        return float(sum(map(ord, completion[:64])) % 7) / 6


def build_random_model(cfg: StepBenchConfig, folder: Path) -> Path:
    """A random Qwen3-architecture model of the benchmark's shape, saved with the character tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ..data.make_default_model import build_tokenizer

    torch.manual_seed(cfg.seed)
    config = Qwen3Config(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.kv_heads, head_dim=cfg.hidden // cfg.heads,
                         max_position_embeddings=cfg.prompt_len + cfg.completion_len + 8, tie_word_embeddings=False,
                         eos_token_id=1, pad_token_id=0, bos_token_id=None)
    model = Qwen3ForCausalLM(config)
    if sum(p.numel() for p in model.parameters()) > 1e9:  # 8B-shaped: bfloat16 on disk (half the size)
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    build_tokenizer().save_pretrained(folder)
    return folder


def variant_config(cfg: StepBenchConfig, model: Path, variant: str) -> TrainConfig:
    """The Trainer configuration of one variant: 'full' (the standard trainer's step), 'sparse' (layer
    `cfg.layer`, everything sparselayer does) or 'sparse-no-share' (the same without shared prompts)."""
    common = {"model": str(model), "prompts_per_step": cfg.prompts, "num_generations": cfg.generations,
              "num_iterations": cfg.num_iterations, "beta": cfg.beta, "micro_batch_size": cfg.micro_batch_size,
              "max_completion_length": cfg.completion_len, "seed": cfg.seed, "dtype": cfg.dtype,
              "device": cfg.device, "learning_rate": 1e-5, "loss_type": "grpo"}
    if variant == "full":  # every parameter, stock modules, separate reference model and old-policy pass
        return TrainConfig.from_mapping({**common, "layers": "all", "quant": "none", "prefix_cache": False,
                                         "fused_layers": False, "fused_loss": False, "share_prompts": "off",
                                         "reference": "copy", "old_logp_pass": cfg.num_iterations > 1})
    return TrainConfig.from_mapping({**common, "layers": str(cfg.layer), "quant": cfg.quant,
                                     "share_prompts": "off" if variant == "sparse-no-share" else "auto"})


def run_variant(cfg: StepBenchConfig, model: Path, variant: str) -> dict[str, Any]:
    """Time `cfg.steps` steps (after a warm-up) of one variant: 'full', 'sparse' or 'sparse-no-share'."""
    from ..trainer import Trainer

    torch.manual_seed(cfg.seed)
    config = variant_config(cfg, model, variant)
    trainer = Trainer(config, task=RandomRewardTask(),
                      engine=SyntheticEngine(cfg.vocab, cfg.prompt_len, cfg.completion_len))
    trainer.step()  # warm-up
    reset_peak(trainer.device)
    totals = dict.fromkeys(PHASES, 0.0)
    for _ in range(cfg.steps):
        metrics = trainer.step()
        for k in PHASES:
            totals[k] += metrics[k]
    per_step = {k: v / cfg.steps for k, v in totals.items()}
    step_time = sum(per_step.values())
    tokens = cfg.prompts * cfg.generations * (cfg.prompt_len + cfg.completion_len)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"variant": variant, "layers": config.model.layers, "step_time_s": step_time,
            "tokens_per_s": tokens / step_time, "peak_mem_bytes": peak_bytes(trainer.device),
            "trainable_params": trainable, **per_step, "device": str(trainer.device), "quant": trainer.quant}


def bench_step(cfg: StepBenchConfig, output: Path | None = None) -> dict[str, Any]:
    """Run the variants, each in a fresh subprocess; return (and write) the table, with ratios when both ran."""
    if cfg.quant not in QUANT_MODES:
        raise ConfigError(f"bench step: --quant must be none, nf4 or int8, got {cfg.quant!r}")
    variants = parse_variants(cfg.variants)
    with tempfile.TemporaryDirectory(prefix="sparselayer-bench-") as tmp:
        model = build_random_model(cfg, Path(tmp) / "model")
        rows = [_run_in_subprocess(cfg, model, v) for v in variants]
    by_name = {r["variant"]: r for r in rows}
    both = "full" in by_name and "sparse" in by_name
    result = {"config": asdict(cfg), "results": rows,
              "speedup": by_name["full"]["step_time_s"] / by_name["sparse"]["step_time_s"] if both else None,
              "peak_mem_ratio": (by_name["sparse"]["peak_mem_bytes"] / by_name["full"]["peak_mem_bytes"]
                                 if both else None),
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "device_name": _device_name(rows[0]["device"])}
    if "sparse" in by_name and "sparse-no-share" in by_name:  # what sharing a group's prompt saves
        result["shared_prompts_speedup"] = by_name["sparse-no-share"]["step_time_s"] / by_name["sparse"]["step_time_s"]
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _device_name(device: str) -> str:
    """The accelerator's name (CUDA) or 'cpu', for the results file."""
    return torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else "cpu"


def _run_in_subprocess(cfg: StepBenchConfig, model: Path, variant: str) -> dict[str, Any]:
    code = ("import json,sys; from pathlib import Path; "
            "from sparselayer.bench.step import StepBenchConfig, run_variant; "
            "cfg = StepBenchConfig(**json.loads(sys.argv[1])); "
            "print('RESULT ' + json.dumps(run_variant(cfg, Path(sys.argv[2]), sys.argv[3])))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(asdict(cfg)), str(model), variant],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark variant {variant} failed:\n{done.stderr[-3000:]}")
    line = next(out for out in done.stdout.splitlines() if out.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of both variants and the ratios."""
    keys = ("step_time_s", "tokens_per_s", "peak_mem_bytes", "logprob_s", "train_s", "trainable_params")
    lines = [f"{'variant':<16}" + "".join(f"{k:>18}" for k in keys)]
    for r in result["results"]:
        cells = [f"{r[k] / 2**20:>16.0f}MB" if k == "peak_mem_bytes" else f"{r[k]:>18.3f}" if isinstance(r[k], float)
                 else f"{r[k]:>18}" for k in keys]
        lines.append(f"{r['variant']:<16}" + "".join(cells))
    if result["speedup"] is not None:
        lines.append(f"speedup (full / sparse step time): {result['speedup']:.2f}x; "
                     f"peak memory sparse / full: {result['peak_mem_ratio']:.1%}")
    if "shared_prompts_speedup" in result:
        lines.append(f"shared prompts (sparse-no-share / sparse step time): {result['shared_prompts_speedup']:.2f}x")
    return "\n".join(lines)
