"""Rollout engines: transformers' generate on the live model (hf), or an in-process vLLM (vllm).

`build_engine` picks one from `--rollout`: auto means vLLM when it is importable and can serve the
model, else hf (or what the environment variable SPARSELAYER_AUTO_ROLLOUT names). vLLM itself is
imported only when its engine is built.
"""
from __future__ import annotations

import os
import sys

import torch

from ..config import RolloutConfig
from ..errors import ConfigError
from .base import RolloutEngine
from .hf import HFRolloutEngine


def build_engine(ro: RolloutConfig, model_dir: str | None, model: torch.nn.Module, tokenizer,
                 seed: int = 0) -> RolloutEngine:
    """The engine `ro.rollout` asks for, colocated with the trainer's `model` loaded from `model_dir`
    (None: the embedded default); a vLLM engine runs in the model's dtype, seeded by `seed`."""
    from ..model.layout import check_model_dir
    from ..sync.vllm_layout import plan_serving
    from .vllm_engine import VLLMRolloutEngine, vllm_importable

    choice = ro.rollout
    device = next(model.parameters()).device
    folder = check_model_dir(model_dir)
    if ro.rollout_url:  # `sparselayer serve` elsewhere: rollouts over HTTP, layer deltas pushed to it
        from .remote import RemoteRolloutEngine
        return RemoteRolloutEngine(ro.rollout_url, tokenizer, base_model=folder, api_key=ro.rollout_api_key)
    if choice == "auto":  # SPARSELAYER_AUTO_ROLLOUT=hf (set by the test suite) skips vLLM
        choice = os.environ.get("SPARSELAYER_AUTO_ROLLOUT", "auto")
    plan = plan_serving(folder, device.type) if choice in ("auto", "vllm") else None
    if choice == "auto":
        problem = (None if vllm_importable() else "vllm is not installed") or plan.problem
        if problem:
            print(f"sparselayer: rollouts with transformers generate ({problem})", file=sys.stderr)
        choice = "hf" if problem else "vllm"
    if choice == "hf":
        return HFRolloutEngine(model, tokenizer)
    if not vllm_importable():
        raise ConfigError("--rollout vllm needs the vllm package (pip install -e '.[cpu]' or '.[gpu]'), "
                          "or use --rollout hf")
    return VLLMRolloutEngine(folder, tokenizer, model.dtype, device.type, ro.max_model_len,
                             ro.gpu_memory_utilization, ro.enforce_eager, ro.sleep_mode, seed, plan=plan,
                             launcher=_launcher(ro, device.type))


def _launcher(ro: RolloutConfig, device_type: str) -> dict | None:
    """vLLM's placement in a multi-GPU torchrun job (external launcher: each rank's engine on its own GPU,
    or spanning --vllm-tensor-parallel-size ranks); None in a single process or on CPU."""
    from ..distributed import vllm_launcher_kwargs, world

    w = world()
    if device_type != "cuda" or w.size == 1:
        return None
    return vllm_launcher_kwargs(ro.vllm_tensor_parallel_size, w)
