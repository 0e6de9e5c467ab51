"""Rollouts from an in-process (colocated) vLLM engine, kept in sync by layer-delta weight pushes.

vLLM is imported only when this engine is built, so `import sparselayer` works without it.
The engine runs in the trainer's dtype (float32 on CPU, where vLLM's CPU backend supports it). With
capture on, a hook inside vLLM's worker records the residual stream entering the lowest trained layer
while it samples (`vllm_capture`).
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..batch import CapturedStates
from ..errors import ConfigError
from ..sync.changes import ChangeTracker
from ..sync.vllm_layout import ServingPlan, head_dim_of, plan_serving, write_padded_model
from ..sync.vllm_push import LAYER_RE, load_scoped, owning_modules, reload_full
from . import vllm_capture
from .base import EnginePrompt, RolloutEngine, Rollouts, prompt_token_ids
from .capture import CaptureSpec, CaptureSupport
from .hf import cut_at_eos

CPU_KV_TOKENS = 32768  # KV-cache size on CPU, in tokens (vLLM's memory fraction means host RAM there)
CPU_BATCH_TOKENS = 4096  # tokens per forward on CPU (vLLM's default for LLM), raised to the context length


def vllm_importable() -> bool:
    """Whether the vllm package can be imported here."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of these tensors (a push is counted in checkpoint form, before any head padding)."""
    return sum(t.numel() * t.element_size() for t in tensors)


class VLLMRolloutEngine(RolloutEngine):
    """A colocated `vllm.LLM` on the trainer's model folder; `update_weights` pushes only what changed."""

    def __init__(self, model_dir: str | Path, tokenizer, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.3, enforce_eager: bool = True,
                 sleep_mode: bool = False, seed: int = 0, plan: ServingPlan | None = None,
                 launcher: dict[str, Any] | None = None):
        """`plan`: the folder's serving plan when the caller has made it already (read here otherwise);
        `launcher`: vLLM arguments that place this engine in a torchrun job (`distributed.vllm_launcher_kwargs`:
        tensor-parallel size, data-parallel size, the external launcher), None in a single process."""
        self.launcher = dict(launcher or {})
        self.tensor_parallel_size = int(self.launcher.get("tensor_parallel_size", 1))
        self.folder, self.tokenizer, self.dtype, self.device = Path(model_dir), tokenizer, dtype, device
        plan = plan_serving(self.folder, device) if plan is None else plan
        if plan.problem:
            raise ConfigError(f"{plan.problem}: use --rollout hf")
        self.padding, config = plan.padding, plan.config
        self.serve_dir = write_padded_model(self.folder, self.padding) if self.padding else self.folder
        if self.serve_dir != self.folder:
            atexit.register(shutil.rmtree, self.serve_dir, True)
        self.sleep_mode = sleep_mode and device != "cpu"  # vLLM's sleep mode needs a GPU
        self.enforce_eager, self.capture = enforce_eager, None
        self.last_capture: dict[str, float] = {}  # bytes recorded during the last capturing call, assembly time
        self.tracker = ChangeTracker(dtype)
        self.last_push: dict[str, float] = {}
        self.llm = self._start(config, max_model_len, gpu_memory_utilization, enforce_eager, seed)

    def _start(self, config: dict, max_model_len: int | None, memory: float, enforce_eager: bool, seed: int):
        """Build the in-process LLM, keeping the trainer's torch thread settings (vLLM lowers them)."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its start-up notices are not the user's business
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
        from vllm import LLM

        max_len = max_model_len or int(config.get("max_position_embeddings") or 4096)
        kwargs = dict(model=str(self.serve_dir), dtype=str(self.dtype).removeprefix("torch."), seed=seed,
                      max_model_len=max_len, enforce_eager=enforce_eager, logprobs_mode="processed_logprobs",
                      enable_sleep_mode=self.sleep_mode, use_tqdm_on_load=False)
        if self.device == "cpu":
            kwargs["kv_cache_memory_bytes"] = max(CPU_KV_TOKENS, max_len) * self._kv_bytes_per_token(config)
            # whole prompts per forward: a seeded request whose prefill is split fails on CPU in vLLM 0.32
            # ("CPU Generator does not use offset"), as soon as a batch's prompts pass 4096 tokens
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(CPU_BATCH_TOKENS, max_len))
        else:
            kwargs["gpu_memory_utilization"] = memory
        kwargs.update(self.launcher)
        set_threads, threads = torch.set_num_threads, torch.get_num_threads()
        try:
            return LLM(**kwargs)
        finally:
            torch.set_num_threads = set_threads  # vLLM's CPU worker replaces it with a no-op
            torch.set_num_threads(threads)
            # after vLLM's logging setup: its in-place reloader warns about rotary tables, which hold no weights
            logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)

    def _kv_bytes_per_token(self, config: dict) -> int:
        head = self.padding.padded if self.padding else head_dim_of(config)
        kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
        return 2 * config["num_hidden_layers"] * kv_heads * head * torch.finfo(self.dtype).bits // 8

    def capture_support(self, dtype: torch.dtype, quant: str) -> CaptureSupport:
        """Hooks run only in eager mode; the states are the trainer's own (to float32 rounding) only where vLLM
        runs float32 on CPU, in the trainer's dtype, and the trainer's frozen layers are not quantized."""
        if not self.enforce_eager:
            return CaptureSupport(unavailable="vLLM runs the model as CUDA graphs / torch.compile "
                                  "(--no-enforce-eager), where hooks on a layer do not run")
        if quant != "none":
            return CaptureSupport(mismatch=f"the trainer's frozen layers are quantized (--quant {quant}), vLLM's not")
        if dtype != self.dtype or self.dtype != torch.float32 or self.device != "cpu":
            return CaptureSupport(mismatch=f"vLLM {self.device} {self.dtype} kernels differ from the trainer's "
                                  "by more than float32 rounding")
        return CaptureSupport()

    def set_capture(self, spec: CaptureSpec | None) -> None:
        """Hook `spec.layer` inside vLLM's worker (recording only during sampling calls); None: stop."""
        self.capture = spec
        if spec is not None:
            self.llm.collective_rpc(vllm_capture.install, args=(spec.layer, spec.dtype))

    def generate(self, prompts: Sequence[EnginePrompt], num_generations: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, greedy: bool = False) -> Rollouts:
        """Sample with vLLM from token-id prompts (text prompts are tokenized here, without special tokens);
        with capture on (not greedy: evaluation trains nothing), Rollouts.states holds the captured states."""
        from vllm import SamplingParams

        ids = prompt_token_ids(self.tokenizer, prompts)
        n = 1 if greedy else num_generations  # vLLM samples greedily once; the copies are identical
        params = [SamplingParams(n=n, max_tokens=max_new_tokens, seed=seed * 100_003 + i,
                                 temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                                 logprobs=0, detokenize=False) for i in range(len(ids))]
        capture = None if greedy else self.capture
        self._wake()
        if capture is not None:  # every position of this call computed in this call, none from an earlier one
            self.llm.reset_prefix_cache()
            self.llm.collective_rpc(vllm_capture.start)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
        chunks = self.llm.collective_rpc(vllm_capture.stop)[0] if capture is not None else []
        self._sleep()
        rows, completions, logps = [], [], []
        for prompt, out in zip(ids, outputs):
            for sample in sorted(out.outputs, key=lambda s: s.index) * (num_generations // n):
                tokens = cut_at_eos(list(sample.token_ids), self.tokenizer.eos_token_id)
                rows.append(prompt)
                completions.append(tokens)
                logps.append([step[t].logprob for step, t in zip(sample.logprobs, tokens)])
        states = None if capture is None else self._captured(chunks, ids, outputs, completions, n, capture)
        return Rollouts(prompt_ids=rows, completion_ids=completions, sampling_logprobs=logps, states=states)

    def _captured(self, chunks: list, ids: list[list[int]], outputs: list, completions: list[list[int]], n: int,
                  spec: CaptureSpec) -> CapturedStates | None:
        """The rows' states from what the hook recorded (None, with a notice, where a position is missing: the
        trainer then computes its own prefix)."""
        t0 = time.perf_counter()
        sequences, rows, groups = {}, [], []
        for prompt, out in zip(ids, outputs):
            for sample in sorted(out.outputs, key=lambda s: s.index):
                rid = f"{sample.index}_{out.request_id}" if n > 1 else out.request_id
                sequences[rid] = prompt + list(sample.token_ids)
                rows.append((rid, len(prompt), len(completions[len(rows)])))
            groups.append((rows[-n][0], len(prompt)))
        try:
            states = vllm_capture.assemble(chunks, sequences, rows, groups, spec)
        except vllm_capture.MissingStates as e:
            print(f"sparselayer: the trainer computes this batch's prefix itself ({e})", file=sys.stderr)
            states = None
        self.last_capture = {"bytes": float(sum(c.states.numel() * c.states.element_size() for c in chunks)),
                             "seconds": time.perf_counter() - t0}
        return states

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Push the tensors that changed since the last push into vLLM's model; return their bytes."""
        t0 = time.perf_counter()
        changed = self.tracker.changed(named_tensors)
        if not changed:
            self.last_push = {"bytes": 0, "tensors": 0, "seconds": time.perf_counter() - t0}
            return 0
        weights = [(n, self._serve_form(n, t)) for n, t in changed.items()]
        if all(LAYER_RE.match(n) for n in changed):  # decoder layers only: load just their modules
            self._load(load_scoped, weights, owning_modules(changed))
        else:  # embeddings, final norm, LM head (--layers all): the whole-model reload
            self._load(reload_full, weights)
        self.tracker.mark_pushed(changed)
        pushed = nbytes(changed.values())
        self.last_push = {"bytes": pushed, "tensors": len(weights), "seconds": time.perf_counter() - t0}
        return pushed

    def reload_all(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """vLLM's stock in-place reload, which walks the whole model (the baseline a layer push is measured against)."""
        tensors = {n: t.detach().to(dtype=self.dtype) for n, t in named_tensors}
        self._load(reload_full, [(n, self._serve_form(n, t)) for n, t in tensors.items()])
        self.tracker.pushed.clear()  # the next layer push sends its tensors again
        return nbytes(tensors.values())

    def _load(self, fn, *args) -> None:
        """Run a weight loader on the workers (awake), then drop cached prefixes computed with the old weights."""
        self._wake()
        self.llm.collective_rpc(fn, args=args)
        self.llm.reset_prefix_cache()
        self._sleep()

    def _serve_form(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return self.padding.apply(name, tensor) if self.padding else tensor

    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        """vLLM's log-probs of tokens 1..n-1 of `token_ids` given their prefixes (for the sync check)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
        self._wake()
        out = self.llm.generate([{"prompt_token_ids": list(token_ids)}], params, use_tqdm=False)[0]
        self._sleep()
        return [step[t].logprob for step, t in zip(out.prompt_logprobs[1:], token_ids[1:])]

    def _wake(self) -> None:
        if self.sleep_mode:
            self.llm.wake_up()

    def _sleep(self) -> None:
        if self.sleep_mode:
            self.llm.sleep(level=1)

    def close(self) -> None:
        """Free the engine and any padded model copy."""
        self.llm = None
        if self.serve_dir != self.folder:
            shutil.rmtree(self.serve_dir, ignore_errors=True)
