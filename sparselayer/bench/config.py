"""Settings of `sparselayer bench step`: the model shape, batch and variants (plain data, cheap to import:
the CLI builds its flags from it without importing the harness)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

PRESETS = {
    "default": dict(num_layers=24, hidden=512, intermediate=1536, vocab=32768, heads=8, kv_heads=4, layer=12),
    # full-parameter AdamW on 8B (weights, grads, two moments, a reference copy: over 100 GB) fits no
    # single GPU, so this preset measures the layer-sparse step alone unless --variants says otherwise
    "qwen3-8b": dict(num_layers=36, hidden=4096, intermediate=12288, vocab=151936, heads=32, kv_heads=8, layer=16,
                     quant="nf4", variants="sparse", gradient_checkpointing=True),
}
# sparse-no-share: the layer-sparse step with --share-prompts off, to show what sharing a group's prompt adds;
# sparse-rollout: the layer-sparse step with --prefix-source rollout (no frozen-prefix pass in the trainer)
VARIANTS = ("full", "sparse", "sparse-no-share", "sparse-rollout")
CAPTURE_ENGINES = ("auto", "vllm", "hf", "none")


@dataclass
class StepBenchConfig:
    """Model shape, batch and GRPO settings of the step benchmark (a random Qwen3-architecture model).

    Fields:
        num_layers: decoder layers of the random model
        hidden: hidden size
        intermediate: MLP intermediate size
        vocab: vocabulary size
        heads: attention heads
        kv_heads: key/value heads (grouped-query attention)
        layer: the layer the sparse variants train
        prompts: prompts per rollout batch
        generations: completions per prompt
        prompt_len: tokens per prompt (synthetic, fixed length)
        completion_len: tokens per completion (synthetic, fixed length)
        num_iterations: optimization passes per rollout batch
        beta: KL coefficient (beta > 0 runs a reference pass)
        micro_batch_size: sequences per forward/backward
        steps: measured steps, after one warm-up step
        seed: seed of the model, the rollouts and the rewards
        dtype: auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16
        device: auto | cpu | cuda
        quant: frozen layers of the sparse variants: none | nf4 | int8 (the full variant has none)
        variants: which to run, a comma list of full, sparse, sparse-no-share, sparse-rollout (the prefix from the
            rollout's captured states); the ratios need full and sparse
        capture_engine: with sparse-rollout, the real engine that measures what capturing costs sampling (time with
            and without it, bytes held during generation): auto (vllm where installed, else hf) | vllm | hf | none
        gradient_checkpointing: every variant recomputes the trained layer(s) and those above in the backward
            instead of keeping their activations (TRL's default; the qwen3-8b preset turns it on: without it the
            20 layers from 16 up keep about 1 GB each per 8 x 1152-token micro-batch)
    """

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
    steps: int = 2
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    quant: str = "none"
    variants: str = "full,sparse"
    capture_engine: str = "auto"
    gradient_checkpointing: bool = False


def parse_variants(text: str) -> list[str]:
    """'full,sparse' -> ['full', 'sparse'] (in that order); ConfigError for anything else."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names or any(v not in VARIANTS for v in names):
        raise ConfigError("bench step: --variants takes full, sparse, sparse-no-share, sparse-rollout or a comma "
                          f"list, got {text!r}")
    return [v for v in VARIANTS if v in names]
