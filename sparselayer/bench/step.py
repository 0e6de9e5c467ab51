"""Step benchmark: the full-parameter GRPO step as a standard trainer runs it, against the layer-sparse
step, on the same random model, batch and seed. Both are the same `Trainer.step`, configured
differently: the baseline trains every parameter with AdamW, keeps a separate frozen reference
model, runs a separate old-policy pass when num_iterations > 1, runs the whole model in every pass
(no prefix cache, no shared prompts) and uses stock transformers modules and the plain LM head.

Both variants get identical synthetic rollouts (fixed-length random completions with random
rewards), so the figures isolate the training-side work in which they differ; generation is the
same engine for both. Each variant runs in its own subprocess so peak memory is its own.

sparse-rollout is the sparse step with --prefix-source rollout: the synthetic engine returns the states
entering the trained layer (computed as an engine computes them while sampling, that time left out of
the step), and `measure_capture` times a real engine's sampling with and without capturing them.
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

from ..batch import CapturedStates, Rollouts, collate
from ..config import QUANT_MODES, TrainConfig
from ..errors import ConfigError
from ..memory import peak_bytes, reset_peak
from ..metrics import PHASES
from ..model.prefix_cache import compute_prefix
from ..rollout.base import RolloutEngine
from ..rollout.capture import CaptureSpec, CaptureSupport
from ..tasks.base import Example, Task
from .config import CAPTURE_ENGINES, StepBenchConfig, parse_variants


class SyntheticEngine(RolloutEngine):
    """Fixed-length random prompts and completions: the same tokens for every variant (seeded).

    With capture on (the sparse-rollout variant; `model` set to the trainer's) it also returns the states
    entering the trained layer, computed here by the frozen layers as a real engine computes them while it
    samples; that emulation's time (`emulation_s`) is work a real engine does anyway, so the benchmark
    takes it out of the rollout phase and measures what capturing costs a real engine separately.
    """

    def __init__(self, vocab: int, prompt_len: int, completion_len: int):
        self.vocab, self.prompt_len, self.completion_len = vocab, prompt_len, completion_len
        self.capture: CaptureSpec | None = None
        self.model: torch.nn.Module | None = None
        self.emulation_s, self.captured_bytes = 0.0, 0

    def capture_support(self, dtype: torch.dtype, quant: str) -> CaptureSupport:
        return CaptureSupport()

    def set_capture(self, spec: CaptureSpec | None) -> None:
        self.capture = spec

    def generate(self, prompts: Sequence[str], num_generations: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, greedy: bool = False) -> Rollouts:
        g = torch.Generator().manual_seed(seed)
        rows = len(prompts) * num_generations
        p = torch.randint(3, self.vocab, (len(prompts), self.prompt_len), generator=g)
        p = p.repeat_interleave(num_generations, 0)
        c = torch.randint(3, self.vocab, (rows, self.completion_len), generator=g)
        out = Rollouts(prompt_ids=p.tolist(), completion_ids=c.tolist())
        if self.capture is not None and self.model is not None:
            t0 = time.perf_counter()
            out.states = self._states(out, num_generations)
            self.emulation_s, self.captured_bytes = time.perf_counter() - t0, out.states.nbytes()
        return out

    @torch.no_grad()
    def _states(self, rollouts: Rollouts, group_size: int, chunk: int = 8) -> CapturedStates:
        """The frozen layers over every row, `chunk` rows at a time, cut into CapturedStates."""
        spec, P = self.capture, self.prompt_len
        batch = collate(rollouts, 0, next(self.model.parameters()).device)
        prompts, completions = [], []
        for start in range(0, batch.input_ids.shape[0], chunk):
            rows = list(range(start, min(start + chunk, batch.input_ids.shape[0])))
            hidden = compute_prefix(self.model, batch.rows(rows), spec.layer, "off").hidden
            prompts += [hidden[i, :P].to(spec.dtype, copy=True) for i, r in enumerate(rows) if r % group_size == 0]
            completions += [hidden[i, P:-1].to(spec.dtype, copy=True) for i in range(len(rows))]
        return CapturedStates(spec.layer, prompts, completions)

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
    with torch.device("meta"):
        big = sum(p.numel() for p in Qwen3ForCausalLM(config).parameters()) > 1e9
    # 8B-shaped: built in bfloat16 (half the size on disk), on the GPU when there is one (seconds, not minutes)
    on = "cuda" if big and cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    default_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.bfloat16 if big else default_dtype)
        with torch.device(on):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
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
              "device": cfg.device, "learning_rate": 1e-5, "loss_type": "grpo",
              "gradient_checkpointing": cfg.gradient_checkpointing}
    if variant == "full":  # every parameter, stock modules, separate reference model and old-policy pass
        return TrainConfig.from_mapping({**common, "layers": "all", "quant": "none", "prefix_cache": False,
                                         "fused_layers": False, "fused_loss": False, "share_prompts": "off",
                                         "reference": "copy", "old_logp_pass": cfg.num_iterations > 1})
    return TrainConfig.from_mapping({**common, "layers": str(cfg.layer), "quant": cfg.quant,
                                     "fused_layers": True,  # on every device: the recorded figures include them
                                     "share_prompts": "off" if variant == "sparse-no-share" else "auto",
                                     "prefix_source": "rollout" if variant == "sparse-rollout" else "trainer"})


def run_variant(cfg: StepBenchConfig, model: Path, variant: str) -> dict[str, Any]:
    """Time `cfg.steps` steps (after a warm-up) of one variant: 'full', 'sparse', 'sparse-no-share' or
    'sparse-rollout'. `prefix_s`: the frozen-prefix stage (`attach_prefix`), inside logprob_s; `trainer_s`:
    the step without the rollout phase; for sparse-rollout the rollout phase leaves out the emulated
    engine work (`SyntheticEngine`), and `captured_bytes` is what the captured states hold."""
    from ..trainer import Trainer

    torch.manual_seed(cfg.seed)
    config = variant_config(cfg, model, variant)
    engine = SyntheticEngine(cfg.vocab, cfg.prompt_len, cfg.completion_len)
    trainer = Trainer(config, task=RandomRewardTask(), engine=engine)
    engine.model = trainer.model
    prefix = _time_stage(trainer, "attach_prefix")
    trainer.step()  # warm-up
    reset_peak(trainer.device)
    totals = dict.fromkeys(PHASES, 0.0)
    prefix.clear()
    for _ in range(cfg.steps):
        metrics = trainer.step()
        metrics["rollout_s"] -= engine.emulation_s  # sampling computes those states anyway
        for k in PHASES:
            totals[k] += metrics[k]
    per_step = {k: v / cfg.steps for k, v in totals.items()}
    step_time = sum(per_step.values())
    tokens = cfg.prompts * cfg.generations * (cfg.prompt_len + cfg.completion_len)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"variant": variant, "layers": config.model.layers, "step_time_s": step_time,
            "tokens_per_s": tokens / step_time, "peak_mem_bytes": peak_bytes(trainer.device),
            "trainable_params": trainable, **per_step, "device": str(trainer.device), "quant": trainer.quant,
            "prefix_source": trainer.prefix_source, "prefix_s": sum(prefix) / cfg.steps,
            "trainer_s": step_time - per_step["rollout_s"], "captured_bytes": engine.captured_bytes}


def _time_stage(trainer: Any, name: str) -> list[float]:
    """Wrap the trainer's stage `name` so that each call's seconds are appended to the returned list."""
    seconds: list[float] = []
    stage = getattr(trainer, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = stage(*args, **kwargs)
        seconds.append(time.perf_counter() - t0)
        return out

    setattr(trainer, name, timed)
    return seconds


def measure_capture(cfg: StepBenchConfig, model: Path) -> dict[str, Any]:
    """What capturing costs a real engine's sampling on the benchmark's model and batch: after a warm-up call of
    the same shape, at least two calls each with and without capture, alternating, every one from an empty
    vLLM prefix cache (as after a weight push); the best of each, and the bytes held."""
    engine, name = _capture_engine(cfg, model)
    g = torch.Generator().manual_seed(cfg.seed)
    prompts = torch.randint(3, cfg.vocab, (cfg.prompts, cfg.prompt_len), generator=g).tolist()
    spec = CaptureSpec(cfg.layer, engine_dtype(engine), torch.device("cpu"))
    engine.generate(prompts, cfg.generations, cfg.completion_len, seed=cfg.seed)  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    tokens, held = 0, 0
    for _ in range(max(cfg.steps, 2)):
        for capture in (False, True):
            engine.set_capture(spec if capture else None)
            if hasattr(engine, "llm"):  # a capturing call starts from an empty prefix cache: so does this one
                engine.llm.reset_prefix_cache()
            t0 = time.perf_counter()
            out = engine.generate(prompts, cfg.generations, cfg.completion_len, seed=cfg.seed)
            times[capture].append(time.perf_counter() - t0)
            tokens = sum(map(len, out.completion_ids))
            if capture and out.states is not None:
                held = max(held, int(getattr(engine, "last_capture", {}).get("bytes", 0)) or out.states.nbytes())
    engine.close()
    return {"engine": name, "generate_s": min(times[False]), "generate_capture_s": min(times[True]),
            "capture_cost_s": min(times[True]) - min(times[False]), "completion_tokens": tokens,
            "capture_bytes_during_generation": held}


def engine_dtype(engine: RolloutEngine) -> torch.dtype:
    """The dtype an engine samples in (its model's, for the transformers engine)."""
    return getattr(engine, "dtype", None) or next(engine.model.parameters()).dtype


def _capture_engine(cfg: StepBenchConfig, model: Path) -> tuple[RolloutEngine, str]:
    """The engine `cfg.capture_engine` names, on the benchmark's model (float32 on CPU)."""
    from transformers import AutoTokenizer

    from ..model.layout import load_model
    from ..rollout.hf import HFRolloutEngine
    from ..rollout.vllm_engine import VLLMRolloutEngine, vllm_importable

    name = cfg.capture_engine if cfg.capture_engine != "auto" else ("vllm" if vllm_importable() else "hf")
    tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
    if name == "vllm":
        return VLLMRolloutEngine(model, tokenizer, torch.float32, "cpu",
                                 max_model_len=cfg.prompt_len + cfg.completion_len + 8, seed=cfg.seed), name
    return HFRolloutEngine(load_model(model, "float32", "cpu")[0], tokenizer), name


def bench_step(cfg: StepBenchConfig, output: Path | None = None) -> dict[str, Any]:
    """Run the variants, each in a fresh subprocess; return (and write) the table, with ratios when both ran."""
    if cfg.quant not in QUANT_MODES:
        raise ConfigError(f"bench step: --quant must be none, nf4 or int8, got {cfg.quant!r}")
    if cfg.capture_engine not in CAPTURE_ENGINES:
        raise ConfigError(f"bench step: --capture-engine must be auto, vllm, hf or none, got {cfg.capture_engine!r}")
    variants = parse_variants(cfg.variants)
    with tempfile.TemporaryDirectory(prefix="sparselayer-bench-") as tmp:
        model = build_random_model(cfg, Path(tmp) / "model")
        rows = [_run_in_subprocess(cfg, model, "run_variant", v) for v in variants]
        measure = "sparse-rollout" in variants and cfg.capture_engine != "none"
        capture = _run_in_subprocess(cfg, model, "measure_capture") if measure else None
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
    if "sparse-rollout" in by_name:
        result["prefix_from_rollout"] = _rollout_summary(by_name, capture)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _rollout_summary(by_name: dict[str, dict[str, Any]], capture: dict[str, Any] | None) -> dict[str, Any]:
    """What taking the prefix from the rollout saves: against the sparse step (the share of its prefix pass
    saved) and the full one (the speedup, also counting what capturing costs a real engine's sampling)."""
    rollout, sparse, full = by_name["sparse-rollout"], by_name.get("sparse"), by_name.get("full")
    out: dict[str, Any] = {"capture": capture}
    cost = max(capture["capture_cost_s"], 0.0) if capture else 0.0  # a negative cost is the machine's noise
    if sparse:
        saved = sparse["step_time_s"] - rollout["step_time_s"]
        out.update(saved_s=saved, sparse_prefix_s=sparse["prefix_s"],
                   saved_share_of_prefix=saved / sparse["prefix_s"] if sparse["prefix_s"] > 0 else None,
                   saved_share_with_capture_cost=(saved - cost) / sparse["prefix_s"] if sparse["prefix_s"] > 0
                   else None)
    if full:
        out.update(speedup=full["step_time_s"] / rollout["step_time_s"],
                   speedup_with_capture_cost=full["step_time_s"] / (rollout["step_time_s"] + cost))
    return out


def _device_name(device: str) -> str:
    """The accelerator's name (CUDA) or 'cpu', for the results file."""
    return torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else "cpu"


def _run_in_subprocess(cfg: StepBenchConfig, model: Path, function: str, *args: str) -> dict[str, Any]:
    """`function(cfg, model, *args)` of this module in a fresh process (its peak memory its own)."""
    code = ("import json,sys; from pathlib import Path; "
            "from sparselayer.bench import step; "
            "cfg = step.StepBenchConfig(**json.loads(sys.argv[1])); "
            "print('RESULT ' + json.dumps(getattr(step, sys.argv[3])(cfg, Path(sys.argv[2]), *sys.argv[4:])))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(asdict(cfg)), str(model), function, *args],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark {function} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    line = next(out for out in done.stdout.splitlines() if out.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of the variants and the ratios."""
    keys = ("step_time_s", "trainer_s", "prefix_s", "tokens_per_s", "peak_mem_bytes", "logprob_s", "train_s",
            "trainable_params")
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
    if "prefix_from_rollout" in result:
        lines += _rollout_lines(result["prefix_from_rollout"])
    return "\n".join(lines)


def _rollout_lines(summary: dict[str, Any]) -> list[str]:
    """The prefix-from-rollout lines of the table."""
    lines = []
    if summary.get("saved_share_of_prefix") is not None:
        lines.append(f"prefix from the rollout: {summary['saved_s']:.3f} s saved a step, "
                     f"{summary['saved_share_of_prefix']:.0%} of the prefix pass ({summary['sparse_prefix_s']:.3f} s)")
    if "speedup" in summary:
        lines.append(f"speedup (full / sparse-rollout step time): {summary['speedup']:.2f}x, "
                     f"{summary['speedup_with_capture_cost']:.2f}x counting the capture's cost to sampling")
    c = summary.get("capture")
    if c:
        lines.append(f"capture in {c['engine']} sampling: {c['generate_s']:.3f} s -> {c['generate_capture_s']:.3f} s "
                     f"({c['capture_cost_s']:+.3f} s), {c['capture_bytes_during_generation'] / 2**20:.1f} MiB held "
                     "during generation")
    return lines
