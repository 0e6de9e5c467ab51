"""Step benchmark: a full-parameter GRPO step built the way a standard trainer does it, against the
layer-sparse step, on the same random model, batch and seed.

Both variants get identical synthetic rollouts (fixed-length random completions with random
rewards), so the figures isolate the training-side work in which they differ; generation is the
same engine for both. Each variant runs in its own subprocess so peak memory is its own.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .config import QUANT_MODES, TrainConfig
from .errors import ConfigError
from .memory import peak_bytes, reset_peak
from .model.logprobs import completion_logprobs
from .rl.grpo import per_token_loss
from .rollout.base import RolloutEngine, Rollouts
from .tasks.base import Example, Task

PRESETS = {
    "default": dict(num_layers=24, hidden=512, intermediate=1536, vocab=32768, heads=8, kv_heads=4, layer=12),
    # full-parameter AdamW on 8B (weights, grads, two moments, a reference copy: over 100 GB) fits no
    # single GPU, so this preset measures the layer-sparse step alone unless --variants says otherwise
    "qwen3-8b": dict(num_layers=36, hidden=4096, intermediate=12288, vocab=151936, heads=32, kv_heads=8, layer=16,
                     quant="nf4", variants="sparse"),
}
# sparse-no-share: the layer-sparse step with --share-prompts off, to show what sharing a group's prompt adds
VARIANTS = ("full", "sparse", "sparse-no-share")


@dataclass
class StepBenchConfig:
    """Model shape, batch and GRPO settings of the benchmark (defaults: the issue's configuration)."""

    num_layers: int = 24
    hidden: int = 512
    intermediate: int = 1536
    vocab: int = 32768
    heads: int = 8
    kv_heads: int = 4
    layer: int = 12
    prompts: int = 8
    generations: int = 8
    prompt_len: int = 128
    completion_len: int = 128
    num_iterations: int = 2
    beta: float = 0.04
    micro_batch_size: int = 8
    steps: int = 2  # measured steps, after one warm-up step
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    quant: str = "none"  # frozen layers of the sparse variant: none | nf4 | int8 (the full variant has none)
    variants: str = "full,sparse"  # which to run (of full, sparse, sparse-no-share); the ratios need full and sparse


class SyntheticEngine(RolloutEngine):
    """Fixed-length random prompts and completions: the same tokens for every variant (seeded)."""

    def __init__(self, vocab: int, prompt_len: int, completion_len: int):
        self.vocab, self.prompt_len, self.completion_len = vocab, prompt_len, completion_len

    def generate(self, prompts: Sequence[str], num_generations: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, greedy: bool = False) -> Rollouts:
        g = torch.Generator().manual_seed(seed)
        rows = len(prompts) * num_generations
        p = torch.randint(3, self.vocab, (len(prompts), self.prompt_len), generator=g).repeat_interleave(num_generations, 0)
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

    from .data.make_default_model import build_tokenizer

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


def _train_config(cfg: StepBenchConfig, model: Path, layers: str, share_prompts: str = "auto") -> TrainConfig:
    return TrainConfig.from_mapping({
        "model": str(model), "layers": layers, "prompts_per_step": cfg.prompts, "num_generations": cfg.generations,
        "num_iterations": cfg.num_iterations, "beta": cfg.beta, "micro_batch_size": cfg.micro_batch_size,
        "max_completion_length": cfg.completion_len, "seed": cfg.seed, "dtype": cfg.dtype, "device": cfg.device,
        "learning_rate": 1e-5, "loss_type": "grpo", "quant": "none" if layers == "all" else cfg.quant,
        "fused_layers": layers != "all", "share_prompts": share_prompts})  # the baseline runs stock transformers modules, as TRL would


class StandardGRPOStep:
    """The full-parameter baseline as a standard trainer runs it: every parameter trained with AdamW, a
    separate reference model, a full forward for every pass, and a separate old-policy pass when
    num_iterations > 1. It reuses the sparse trainer's rollout, scoring and micro-batching, so the
    two differ only in the training-side work."""

    def __init__(self, trainer):
        self.t = trainer
        for p in trainer.model.parameters():
            p.requires_grad_(True)
        self.params = [p for p in trainer.model.parameters()]
        trainer.reference = None  # the baseline keeps its reference as a separate model, below
        self.ref_model = copy.deepcopy(trainer.model).requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(self.params, lr=trainer.config.rl.learning_rate)

    @torch.no_grad()
    def _logprobs(self, model, sb) -> torch.Tensor:
        out = torch.zeros(sb.batch.completion_mask.shape, device=self.t.device)
        for rows in sb.micro_batches:
            logp = completion_logprobs(model, sb.batch.rows(rows))
            out[rows, : logp.shape[1]] = logp
        return out

    def step(self) -> dict[str, float]:
        t, rl = self.t, self.t.config.rl
        marks, last = {}, time.perf_counter()

        def mark(name):
            nonlocal last
            now = time.perf_counter()
            marks[name] = marks.get(name, 0.0) + now - last
            last = now

        examples = t._next_examples()
        rollouts = t._generate(examples)
        mark("rollout_s")
        sb = t._score(rollouts, examples)
        mark("reward_s")
        sb.ref_logp = self._logprobs(self.ref_model, sb) if rl.beta > 0 else None
        sb.old_logp = self._logprobs(t.model, sb) if rl.num_iterations > 1 else None
        mark("logprob_s")
        for _ in range(rl.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            t.model.train()
            for rows in sb.micro_batches:
                sub = sb.batch.rows(rows)
                logp = completion_logprobs(t.model, sub)
                C = logp.shape[1]
                old = sb.old_logp[rows, :C] if sb.old_logp is not None else logp.detach()
                ref = sb.ref_logp[rows, :C] if sb.ref_logp is not None else None
                tl = per_token_loss(logp, old, sb.advantages[rows], rl.epsilon, rl.epsilon, rl.beta, ref)
                (tl.loss * sb.weights[rows, :C]).sum().backward()
            torch.nn.utils.clip_grad_norm_(self.params, rl.max_grad_norm)
            self.optimizer.step()
        mark("train_s")
        t.step_count += 1
        marks["push_s"] = 0.0
        return marks


def run_variant(cfg: StepBenchConfig, model: Path, variant: str) -> dict[str, Any]:
    """Time `cfg.steps` steps (after a warm-up) of one variant: 'full', 'sparse' or 'sparse-no-share'."""
    from .trainer import Trainer

    torch.manual_seed(cfg.seed)
    layers = "all" if variant == "full" else str(cfg.layer)
    share = "off" if variant == "sparse-no-share" else "auto"
    trainer = Trainer(_train_config(cfg, model, layers, share), task=RandomRewardTask(),
                      engine=SyntheticEngine(cfg.vocab, cfg.prompt_len, cfg.completion_len))
    runner = StandardGRPOStep(trainer) if variant == "full" else trainer
    phase_keys = ("rollout_s", "reward_s", "logprob_s", "train_s", "push_s")
    runner.step()  # warm-up
    reset_peak(trainer.device)
    totals = dict.fromkeys(phase_keys, 0.0)
    for _ in range(cfg.steps):
        phases = runner.step()
        for k in phase_keys:
            totals[k] += phases[k]
    per_step = {k: v / cfg.steps for k, v in totals.items()}
    step_time = sum(per_step.values())
    tokens = cfg.prompts * cfg.generations * (cfg.prompt_len + cfg.completion_len)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"variant": variant, "layers": layers, "step_time_s": step_time, "tokens_per_s": tokens / step_time,
            "peak_mem_bytes": peak_bytes(trainer.device), "trainable_params": trainable, **per_step,
            "device": str(trainer.device), "quant": trainer.quant}


def parse_variants(text: str) -> list[str]:
    """'full,sparse' -> ['full', 'sparse'] (in that order); ConfigError for anything else."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names or any(v not in VARIANTS for v in names):
        raise ConfigError(f"bench step: --variants takes full, sparse, sparse-no-share or a comma list, got {text!r}")
    return [v for v in VARIANTS if v in names]


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
              "peak_mem_ratio": by_name["sparse"]["peak_mem_bytes"] / by_name["full"]["peak_mem_bytes"] if both else None,
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
    code = ("import json,sys; from pathlib import Path; from sparselayer.bench import StepBenchConfig, run_variant; "
            "cfg = StepBenchConfig(**json.loads(sys.argv[1])); "
            "print('RESULT ' + json.dumps(run_variant(cfg, Path(sys.argv[2]), sys.argv[3])))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(asdict(cfg)), str(model), variant],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark variant {variant} failed:\n{done.stderr[-3000:]}")
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
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
