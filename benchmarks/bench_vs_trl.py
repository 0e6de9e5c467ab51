"""sparselayer against TRL's own GRPOTrainer, one trained decoder layer on both sides, side by side.

TRL's side is `trl.GRPOTrainer` run the way a TRL user trains one layer today: the model loaded with
transformers, every parameter but the chosen layer's set to requires_grad=False, GRPOConfig defaults
except the settings both sides share. sparselayer's side is its `sparselayer.trl.GRPOTrainer` front
door when that module exists (`--sparselayer-api trl`), else `sparselayer.Trainer` (`--sparselayer-api
trainer`). Both sample with transformers' generate on CPU (`--rollout vllm`: vLLM on both, for a GPU
machine; untested here), on the same random-weight model, prompts, reward function and seed, each
side in its own fresh process so that its peak memory is its own.

The unit compared is a whole ROLLOUT BATCH (`prompts x generations` completions and everything done
with them: sampling, scoring, log-prob passes, num_iterations optimizer passes, weight sync): TRL
samples once per steps_per_generation x num_iterations micro-steps, sparselayer once per step.

The model never samples its EOS token (`never_eos`), so every completion is `--completion-len` tokens
on both sides: the same work, whatever the random weights would have stopped at.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_vs_trl.py --sides sparselayer,sparselayer-capture,trl,trl-no-gc
    [--prompt-len 128] [--batches 2] [--output benchmarks/results/vs_trl_cpu.json] ...
Sides: trl (GRPOConfig's defaults: gradient checkpointing on), trl-no-gc (off: TRL's faster setting on time),
sparselayer (its defaults), sparselayer-capture (--prefix-source rollout: the generate pass's states enter the
trained layer, no frozen-prefix pass).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's sparselayer, like the other scripts

SIDES = ("trl", "trl-no-gc", "sparselayer", "sparselayer-capture")
ROLLOUTS = ("hf", "vllm")
APIS = ("auto", "trl", "trainer")
LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")  # both sides' loss types that need no further setting
PHASES = ("generation_s", "reward_s", "logprob_s", "train_s", "sync_s")


@dataclass
class VsTrlConfig:
    """The shared shape and settings of both sides (one source: each side reads its values from here)."""

    num_layers: int = 24
    hidden: int = 512
    intermediate: int = 1536
    heads: int = 8
    kv_heads: int = 4
    layer: int = 12
    prompts: int = 8
    generations: int = 8
    prompt_len: int = 128  # as `sparselayer bench step`; GSM8K-style prompts with a template run ~100-250 tokens
    completion_len: int = 64
    micro_batch_size: int = 8
    num_iterations: int = 1
    beta: float = 0.0
    loss_type: str = "dapo"
    learning_rate: float = 1e-6
    temperature: float = 1.0
    batches: int = 2
    warmup: int = 1
    seed: int = 0
    rollout: str = "hf"
    sides: str = "trl,sparselayer"
    sparselayer_api: str = "auto"
    sparselayer_settings: str = "{}"  # JSON object of further sparselayer settings (TrainConfig keys), e.g. kernels

    def check(self) -> VsTrlConfig:
        """ValueError with one line on the first setting that cannot run."""
        for name in ("num_layers", "hidden", "intermediate", "heads", "kv_heads", "prompts", "prompt_len",
                     "completion_len", "micro_batch_size", "num_iterations", "batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.generations < 2:
            raise ValueError("--generations must be at least 2 (a GRPO group)")
        if not 0 <= self.layer < self.num_layers:
            raise ValueError(f"--layer must be in [0, {self.num_layers - 1}], got {self.layer}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError("--hidden must be a multiple of --heads, and --heads of --kv-heads")
        if (self.prompts * self.generations) % self.micro_batch_size:
            raise ValueError("--micro-batch-size must divide --prompts x --generations (TRL's generation batch "
                             "is a whole number of micro-batches)")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.rollout not in ROLLOUTS:
            raise ValueError(f"--rollout must be one of {', '.join(ROLLOUTS)}, got {self.rollout!r}")
        if self.sparselayer_api not in APIS:
            raise ValueError(f"--sparselayer-api must be one of {', '.join(APIS)}, got {self.sparselayer_api!r}")
        try:
            extra = json.loads(self.sparselayer_settings)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--sparselayer-settings is not JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise ValueError("--sparselayer-settings must be a JSON object of sparselayer settings")
        unknown = [s for s in self.side_list() if s not in SIDES]
        if unknown or not self.side_list():
            raise ValueError(f"--sides takes a comma-separated list of {', '.join(SIDES)}, got {self.sides!r}")
        return self

    def side_list(self) -> list[str]:
        return [s.strip() for s in self.sides.split(",") if s.strip()]

    @property
    def rows(self) -> int:
        """Completions per rollout batch."""
        return self.prompts * self.generations


# -- the shared inputs: model, prompts, reward ------------------------------------------------------------

def reward(prompts: Sequence[Any] | None = None, completions: Sequence[str] = (), **kwargs: Any) -> list[float]:
    """The benchmark's reward, in TRL's convention (both sides call this very function): the share of
    digits in the completion, so that rewards differ within a group and advantages are non-zero."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def write_prompts(cfg: VsTrlConfig, path: Path) -> Path:
    """A JSONL file of addition prompts, each exactly `prompt_len` characters (one token each), enough for
    every rollout batch of the run on both sides."""
    import random

    rng = random.Random(cfg.seed)
    n = cfg.prompts * (cfg.warmup + cfg.batches) * 2 + 16
    lines = []
    for _ in range(n):
        text = f"{rng.randrange(10**6)}+{rng.randrange(10**6)}="
        text = (" " * cfg.prompt_len + text)[-cfg.prompt_len:]
        lines.append(json.dumps({"prompt": text}))
    path.write_text("\n".join(lines) + "\n")
    return path


def build_model(cfg: VsTrlConfig, folder: Path) -> Path:
    """A random-weight Qwen3 of the benchmark's shape with the embedded model's character tokenizer, saved
    (float32) where both sides load it from."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from sparselayer.data import DEFAULT_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    torch.manual_seed(cfg.seed)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.kv_heads, head_dim=cfg.hidden // cfg.heads,
                         max_position_embeddings=cfg.prompt_len + cfg.completion_len + 16,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = never_eos(Qwen3ForCausalLM(config), tokenizer.eos_token_id)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def never_eos(model: Any, eos_id: int) -> Any:
    """Make a random model never sample `eos_id`: the last residual dimension holds 1.0 from the embedding
    through every layer (no attention or MLP output writes it), and the EOS row of the LM head reads it with
    weight -1e3, so the EOS logit is far below every other. Every completion is then max-length."""
    import torch

    d = model.config.hidden_size - 1
    with torch.no_grad():
        model.model.embed_tokens.weight[:, d] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[d] = 0.0
            layer.mlp.down_proj.weight[d] = 0.0
        model.lm_head.weight[eos_id] = 0.0
        model.lm_head.weight[eos_id, d] = -1e3
    return model


# -- one side, in its own process ---------------------------------------------------------------------------

def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def now() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): on a shared machine the CPU time is the steadier figure."""
    return time.perf_counter(), time.process_time()


class Phases:
    """Wall and CPU seconds of every call of the wrapped methods, by phase name, in call order."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[float, float]]] = {}

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        """Time each call of `owner.name` (a class: every instance; an object: that one) as `phase`."""
        method = getattr(owner, name)
        calls = self.calls.setdefault(phase, [])

        def timed(*args: Any, **kwargs: Any) -> Any:
            w0, c0 = now()
            try:
                return method(*args, **kwargs)
            finally:
                w1, c1 = now()
                calls.append((w1 - w0, c1 - c0))

        setattr(owner, name, timed)

    def mean(self, phase: str, measured: slice, cpu: bool = False) -> float:
        return _mean([c[int(cpu)] for c in self.calls.get(phase, [])[measured]])


def _param_bytes(model: Any, trainable_only: bool) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or not trainable_only)


def grpo_config(cfg: VsTrlConfig, output_dir: Path, gradient_checkpointing: bool | None) -> Any:
    """TRL's GRPOConfig with the shared settings (every other field at TRL's default); `gradient_checkpointing`
    None keeps TRL's default (True). One optimizer step per rollout batch, as with TRL's defaults
    (steps_per_generation = gradient_accumulation_steps)."""
    from trl import GRPOConfig

    extra: dict[str, Any] = {} if gradient_checkpointing is None else {"gradient_checkpointing": gradient_checkpointing}
    if cfg.rollout == "vllm":
        extra.update(use_vllm=True, vllm_mode="colocate")
    return GRPOConfig(
        output_dir=str(output_dir), seed=cfg.seed, use_cpu=cfg.rollout == "hf",
        bf16=False,  # float32 on both sides (sparselayer's dtype on CPU; TRL's bf16 would autocast training only)
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.rows // cfg.micro_batch_size,
        num_generations=cfg.generations, max_completion_length=cfg.completion_len,
        temperature=cfg.temperature, learning_rate=cfg.learning_rate, loss_type=cfg.loss_type, beta=cfg.beta,
        num_iterations=cfg.num_iterations, max_steps=(cfg.warmup + cfg.batches) * cfg.num_iterations,
        report_to="none", save_strategy="no", disable_tqdm=True, **extra)


def run_trl(cfg: VsTrlConfig, model_dir: Path, data: Path, gradient_checkpointing: bool | None) -> dict[str, Any]:
    """TRL's GRPOTrainer with one layer left trainable by hand; `gradient_checkpointing` None keeps
    GRPOConfig's default (True). Times whole rollout batches after `cfg.warmup` of them."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prefix = f"model.layers.{cfg.layer}."
    for name, p in model.named_parameters():  # what a TRL user does today to train one layer
        p.requires_grad_(name.startswith(prefix))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = grpo_config(cfg, model_dir.parent / f"out-trl-{gradient_checkpointing}", gradient_checkpointing)
    dataset = load_dataset("json", data_files=str(data), split="train")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    phases, lengths = Phases(), []
    phases.wrap(trainer, "_generate_single_turn", "generation")
    phases.wrap(trainer, "_calculate_rewards", "reward")
    phases.wrap(trainer, "_generate_and_score_completions", "prepare")
    prepare = trainer._generate_and_score_completions

    def record_lengths(*a: Any, **k: Any) -> Any:
        out = prepare(*a, **k)
        lengths.append(float(out["completion_mask"].sum(dim=1).float().mean()))
        return out

    trainer._generate_and_score_completions = record_lengths
    ends: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            ends.append(now())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            ends.append(now())

    trainer.add_callback(Clock())
    trainer.train()
    n = cfg.num_iterations  # optimizer steps (global steps) per rollout batch
    phases.calls["batch"] = [(ends[i + n][0] - ends[i][0], ends[i + n][1] - ends[i][1])
                             for i in range(0, len(ends) - 1, n)]
    moved = max(float((p.detach() - before[k]).abs().max()) for k, p in model.named_parameters() if k in before)
    row = _row(cfg, phases, {"generation_s": "generation", "reward_s": "reward"}, "prepare")
    side = "trl" if gradient_checkpointing is None else "trl-no-gc"
    return {"side": side, **row, "peak_rss_bytes": peak_rss_bytes(),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "sync_bytes": 0 if cfg.rollout == "hf" else _param_bytes(model, trainable_only=False),
            "vllm_sync_bytes": _param_bytes(model, trainable_only=False),  # TRL's sync_weights: every parameter
            "completion_len_mean": _mean(lengths[cfg.warmup:]), "gradient_checkpointing": args.gradient_checkpointing,
            "trained_layer_moved": moved, "api": f"trl.GRPOTrainer {_version('trl')}"}


def _row(cfg: VsTrlConfig, phases: Phases, named: dict[str, str], before_train: str | None) -> dict[str, Any]:
    """Per rollout batch (after the warm-up): the total and each phase, wall and CPU seconds. `before_train`:
    the phase that holds sampling, scoring and the log-prob passes (TRL's), whose rest is logprob_s; without
    it (sparselayer) logprob_s is the batch less every other phase."""
    measured = slice(cfg.warmup, cfg.warmup + cfg.batches)
    out: dict[str, Any] = {}
    for cpu, suffix in ((False, "_s"), (True, "_cpu_s")):
        batch = phases.mean("batch", measured, cpu)
        got = {k.replace("_s", suffix): phases.mean(v, measured, cpu) for k, v in named.items()}
        if before_train:
            got["logprob" + suffix] = phases.mean(before_train, measured, cpu) - sum(got.values())
            got["sync" + suffix] = 0.0  # transformers' generate samples from the trained module; vLLM: in generation
            got["train" + suffix] = batch - phases.mean(before_train, measured, cpu)
        else:
            got["logprob" + suffix] = batch - sum(got.values())
        out.update({"rollout_batch" + suffix: batch, **got})
    out["batch_s_each"] = [c[0] for c in phases.calls["batch"][measured]]
    return out


def run_sparselayer(cfg: VsTrlConfig, model_dir: Path, data: Path, prefix_source: str) -> dict[str, Any]:
    """sparselayer on the same model, prompts and reward: its TRL-shaped front door when present, else its
    Trainer. Times `cfg.batches` rollout batches (steps) after `cfg.warmup` of them."""
    import torch

    from sparselayer.rollout.hf import HFRolloutEngine
    from sparselayer.trainer import Trainer

    torch.manual_seed(cfg.seed)
    phases, seen = Phases(), {}
    for name, phase in (("step", "batch"), ("generate", "generation"), ("score", "reward"),
                        ("optimize_passes", "train")):
        phases.wrap(Trainer, name, phase)  # the class: the front door builds its Trainer inside train()
    phases.wrap(HFRolloutEngine, "update_weights", "sync")
    if cfg.rollout == "vllm":
        from sparselayer.rollout.vllm_engine import VLLMRolloutEngine

        phases.wrap(VLLMRolloutEngine, "update_weights", "sync")
    step = Trainer.step

    def keep(self: Any) -> dict[str, Any]:
        metrics = step(self)
        seen.update(trainer=self, metrics=[*seen.get("metrics", []), metrics])
        return metrics

    Trainer.step = keep
    api = _sparselayer_api(cfg.sparselayer_api)
    if api == "trl":
        _front_door(cfg, model_dir, data, prefix_source).train()
    else:
        trainer = _api_trainer(cfg, model_dir, data, prefix_source)
        for _ in range(cfg.warmup + cfg.batches):
            trainer.step()
    trainer, rows = seen["trainer"], seen["metrics"][cfg.warmup:]
    names = {"generation_s": "generation", "reward_s": "reward", "train_s": "train", "sync_s": "sync"}
    model = trainer.model
    return {"side": "sparselayer" if prefix_source == "auto" else "sparselayer-capture",
            **_row(cfg, phases, names, None), "peak_rss_bytes": peak_rss_bytes(),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "sync_bytes": int(_mean([r.get("push_bytes", 0) for r in rows])),
            "vllm_sync_bytes": _param_bytes(model, trainable_only=True),  # the trained layer's tensors
            "completion_len_mean": _mean([r["completion_length"] for r in rows]),
            "gradient_checkpointing": trainer.config.model.gradient_checkpointing,
            "prefix_source": trainer.prefix_source, "fused_layers": trainer.config.model.fused_layers,
            "shared_micro_batches": rows[-1].get("shared_micro_batches"),
            "api": "sparselayer.trl.GRPOTrainer" if api == "trl" else "sparselayer.Trainer"}


def _sparselayer_api(wanted: str) -> str:
    """'trl' (the front door, sparselayer.trl) or 'trainer'; auto: the front door when it imports."""
    if wanted != "auto":
        return wanted
    try:
        from sparselayer.trl import GRPOTrainer  # noqa: F401
    except ImportError:
        return "trainer"
    return "trl"


def _settings(cfg: VsTrlConfig, model_dir: Path, data: Path, prefix_source: str) -> dict[str, Any]:
    """sparselayer's settings for the shared ones (TRL's names where both have them)."""
    return {"model": str(model_dir), "dataset": str(data), "reward": [f"{Path(__file__).resolve()}:reward"],
            "layers": str(cfg.layer), "prompts_per_step": cfg.prompts, "num_generations": cfg.generations,
            "micro_batch_size": cfg.micro_batch_size, "max_completion_length": cfg.completion_len,
            "temperature": cfg.temperature, "learning_rate": cfg.learning_rate, "loss_type": cfg.loss_type,
            "beta": cfg.beta, "num_iterations": cfg.num_iterations, "seed": cfg.seed, "rollout": cfg.rollout,
            "dtype": "float32", "device": "cpu" if cfg.rollout == "hf" else "auto", "quant": "none",
            "prefix_source": prefix_source, "chat_template": "none", "progress": False, "eval_at_start": False,
            "eval_at_end": False, **json.loads(cfg.sparselayer_settings)}


def _api_trainer(cfg: VsTrlConfig, model_dir: Path, data: Path, prefix_source: str) -> Any:
    from sparselayer.config import TrainConfig
    from sparselayer.trainer import Trainer

    return Trainer(TrainConfig.from_mapping(_settings(cfg, model_dir, data, prefix_source)))


def _front_door(cfg: VsTrlConfig, model_dir: Path, data: Path, prefix_source: str) -> Any:
    """sparselayer.trl.GRPOTrainer given TRL's side's very GRPOConfig (sparselayer keeps its own default of no
    gradient checkpointing), the same dataset, reward function and tokenizer, and `layers=`."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from sparselayer.trl import GRPOTrainer

    args = grpo_config(cfg, model_dir.parent / f"out-sparselayer-{prefix_source}", gradient_checkpointing=False)
    dataset = load_dataset("json", data_files=str(data), split="train")
    return GRPOTrainer(model=str(model_dir), reward_funcs=reward, args=args, train_dataset=dataset,
                       processing_class=AutoTokenizer.from_pretrained(model_dir), layers=str(cfg.layer),
                       rollout=cfg.rollout, quant="none", prefix_source=prefix_source, eval_at_start=False,
                       eval_at_end=False, **json.loads(cfg.sparselayer_settings))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


# -- the driver -------------------------------------------------------------------------------------------

def run_side(cfg: VsTrlConfig, side: str, model_dir: Path, data: Path) -> dict[str, Any]:
    """One side's measurement (called in the side's own process)."""
    if side.startswith("sparselayer"):
        return run_sparselayer(cfg, model_dir, data, "rollout" if side == "sparselayer-capture" else "auto")
    return run_trl(cfg, model_dir, data, None if side == "trl" else False)


def _in_subprocess(cfg: VsTrlConfig, side: str, model_dir: Path, data: Path) -> dict[str, Any]:
    """`run_side` in a fresh Python process: its peak RSS is that side's alone."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--model-dir", str(model_dir),
           "--data", str(data), *to_args(cfg)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"side {side} failed (exit {done.returncode}):\n{(done.stderr or done.stdout)[-4000:]}")
    line = next(out for out in done.stdout.splitlines() if out.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def bench(cfg: VsTrlConfig, output: Path | None = None) -> dict[str, Any]:
    """Build the model and prompts, run each side in its own process, return (and write) the results."""
    import torch

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sparselayer-vs-trl-") as tmp:
        model_dir = build_model(cfg, Path(tmp) / "model")
        data = write_prompts(cfg, Path(tmp) / "prompts.jsonl")
        rows = []
        for side in cfg.side_list():
            rows.append(_in_subprocess(cfg, side, model_dir, data))
            print(f"{side}: " + json.dumps(rows[-1]), file=sys.stderr, flush=True)  # each side as it ends
    result = {"config": asdict(cfg), "results": rows, "ratios": ratios(rows),
              "date": time.strftime("%Y-%m-%d"), "machine": machine(), "torch": torch.__version__,
              "trl": _version("trl"), "transformers": _version("transformers"),
              "command": "python benchmarks/bench_vs_trl.py " + " ".join(sys.argv[1:]),
              "wall_s": time.perf_counter() - started}
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
    return result


def ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Each sparselayer row against each TRL row: sparselayer / TRL per figure (time and memory: below 1 is
    sparselayer's advantage), and the speedup (TRL time / sparselayer time), wall and CPU."""
    ours = [r for r in rows if r["side"].startswith("sparselayer")]
    theirs = [r for r in rows if r["side"].startswith("trl")]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for a in ours:
        for b in theirs:
            q = {"speedup": b["rollout_batch_s"] / a["rollout_batch_s"],
                 "speedup_cpu": b["rollout_batch_cpu_s"] / a["rollout_batch_cpu_s"],
                 "peak_rss": a["peak_rss_bytes"] / b["peak_rss_bytes"],
                 "trainable_params": a["trainable_params"] / b["trainable_params"]}
            for k in ("rollout_batch", *(p.removesuffix("_s") for p in PHASES)):
                for suffix in ("_s", "_cpu_s"):
                    q[k + suffix] = a[k + suffix] / b[k + suffix] if b[k + suffix] > 0 else math.nan
            out.setdefault(a["side"], {})[b["side"]] = q
    return out


def machine() -> str:
    """The machine in words: CPU model and cores, or the GPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, no GPU"


def format_table(result: dict[str, Any]) -> str:
    """The sides as rows (wall seconds, CPU seconds in brackets), then the ratios sparselayer / TRL."""
    head = ("s/rollout batch", *(p.removesuffix("_s") for p in PHASES), "peak RSS MB", "trainable", "sync B",
            "vLLM sync B", "compl. len")
    lines = [f"{'side':<20}" + "".join(f"{h:>18}" for h in head)]
    for r in result["results"]:
        times = [f"{r[k + '_s']:.2f} ({r[k + '_cpu_s']:.2f})" for k in ("rollout_batch", *(p[:-2] for p in PHASES))]
        cells = [*times, f"{r['peak_rss_bytes'] / 2**20:.0f}", r["trainable_params"], r["sync_bytes"],
                 r["vllm_sync_bytes"], f"{r['completion_len_mean']:.1f}"]
        lines.append(f"{r['side']:<20}" + "".join(f"{c:>18}" for c in cells))
    for ours, against in result["ratios"].items():
        for theirs, q in against.items():
            lines.append(f"{ours} / {theirs}: time per rollout batch {q['rollout_batch_s']:.2f} (speedup "
                         f"{q['speedup']:.2f}x; CPU time {q['speedup_cpu']:.2f}x), peak RSS {q['peak_rss']:.2f}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> tuple[VsTrlConfig, argparse.Namespace]:
    """The shared settings (one flag per VsTrlConfig field), --output, and the internal --child flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in fields(VsTrlConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                            help=f"(default {f.default})")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    cfg = VsTrlConfig(**{f.name: getattr(ns, f.name) for f in fields(VsTrlConfig)})
    try:
        cfg.check()
    except ValueError as exc:
        parser.error(str(exc))
    return cfg, ns


def to_args(cfg: VsTrlConfig) -> list[str]:
    """The flags that rebuild `cfg` (for a side's process)."""
    return [a for f in fields(cfg) for a in ("--" + f.name.replace("_", "-"), str(getattr(cfg, f.name)))]


def main(argv: Sequence[str] | None = None) -> int:
    cfg, ns = parse_args(argv)
    if ns.child:
        print("RESULT " + json.dumps(run_side(cfg, ns.child, ns.model_dir, ns.data)), flush=True)
        return 0
    try:
        result = bench(cfg, ns.output)
    except RuntimeError as exc:  # a side's process failed: its own error output follows the first line
        print(f"bench_vs_trl: error: {exc}", file=sys.stderr)
        return 1
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
