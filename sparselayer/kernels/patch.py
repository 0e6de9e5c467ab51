"""Swap the fused RMSNorm / SwiGLU kernels into the layers that run with autograd.

`use_fused_kernels(model, trained_layers, backend)` replaces the `forward` of the RMSNorm modules
(input/post-attention norms, Qwen3's q_norm/k_norm, the final norm) and of the SwiGLU MLP modules of
the trained layer(s) and of every layer above the lowest one. The prefix below it runs without autograd
(frozen-prefix cache) and is left alone. Only instance `forward` attributes change: parameter names,
state dicts, checkpoints and export are untouched, and `restore_forward` undoes the swap.

Each patched forward picks its path per call:
  no autograd (generation, no-grad log-prob passes)  -> the module's own HF forward, unchanged
  RMSNorm                                           -> fused; dW only when the weight requires grad
  MLP with trainable weights                        -> its Linear layers around the fused SwiGLU
  frozen MLP of plain nn.Linear layers              -> `frozen_mlp` (saves its input only), or the
                                                       fused SwiGLU with suffix_mlp="swiglu"
  frozen MLP of other (e.g. quantized) linears      -> its Linear layers around the fused SwiGLU
"""
from __future__ import annotations

import os
import types

import torch
from torch import nn

from ..errors import ConfigError
from .backend import resolve_backend, triton_available
from .norm_mlp import frozen_mlp, rms_norm, swiglu

NORM_CLASSES = ("Qwen3RMSNorm", "Qwen2RMSNorm", "LlamaRMSNorm")
MLP_CLASSES = ("Qwen3MLP", "Qwen2MLP", "LlamaMLP")
SUFFIX_MLP_MODES = ("recompute", "swiglu")
SILU_NAMES = ("silu", "swish")
_BACKEND, _MODE = "_sparselayer_kernels", "_sparselayer_suffix_mlp"


def resolve_kernels(backend: str, device: torch.device) -> str:
    """'torch' or 'triton' for --kernels on this device (explicit value, then SPARSELAYER_KERNELS, then
    triton on CUDA); ConfigError when it is not a backend or when Triton cannot run here."""
    try:
        resolved = resolve_backend(backend, device)
    except ValueError as exc:
        raise ConfigError(f"--kernels: {exc}") from None
    if resolved == "triton":
        if not triton_available():
            raise ConfigError("--kernels triton needs the triton package (pip install triton)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError("--kernels triton needs a CUDA device (or TRITON_INTERPRET=1 to interpret on CPU)")
    return resolved


def is_rms_norm(module: nn.Module) -> bool:
    """A Qwen3/Qwen2/Llama RMSNorm (weight of the normalized size, variance_epsilon)."""
    return type(module).__name__ in NORM_CLASSES and hasattr(module, "variance_epsilon")


def is_swiglu_mlp(module: nn.Module) -> bool:
    """A Qwen3/Qwen2/Llama MLP whose activation is SiLU: down(silu(gate(x)) * up(x))."""
    act = getattr(getattr(module, "config", None), "hidden_act", None)
    return type(module).__name__ in MLP_CLASSES and act in SILU_NAMES and hasattr(module, "gate_proj")


def _trainable(module: nn.Module) -> bool:
    """Whether any parameter of `module` requires grad."""
    return any(p.requires_grad for p in module.parameters())


def _grad_needed(x: torch.Tensor, trainable: bool) -> bool:
    """Whether autograd will record this call (grad mode on and the input or a parameter needs grad)."""
    return torch.is_grad_enabled() and (x.requires_grad or trainable)


def _fused_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """RMSNorm forward: fused under autograd, the HF forward otherwise."""
    if not _grad_needed(hidden_states, _trainable(self)):
        return type(self).forward(self, hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, getattr(self, _BACKEND))


def _plain_linears(mlp: nn.Module) -> bool:
    """All three projections are dense nn.Linear (not quantized replacements)."""
    return all(type(getattr(mlp, n)) is nn.Linear for n in ("gate_proj", "up_proj", "down_proj"))


def _fused_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU MLP forward: frozen_mlp or Linear + fused SwiGLU under autograd, the HF forward otherwise."""
    trainable = _trainable(self)
    if not _grad_needed(x, trainable):
        return type(self).forward(self, x)
    backend = getattr(self, _BACKEND)
    if not trainable and getattr(self, _MODE) == "recompute" and _plain_linears(self):
        g, u, d = self.gate_proj, self.up_proj, self.down_proj
        return frozen_mlp(x, g.weight, u.weight, d.weight, g.bias, u.bias, d.bias, backend)
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend))


def _patch(module: nn.Module, backend: str, suffix_mlp: str) -> int:
    """Patch every RMSNorm and SwiGLU MLP inside `module` (itself included); return how many."""
    count = 0
    for sub in module.modules():
        if is_rms_norm(sub):
            sub.forward = types.MethodType(_fused_norm_forward, sub)
        elif is_swiglu_mlp(sub):
            sub.forward = types.MethodType(_fused_mlp_forward, sub)
            setattr(sub, _MODE, suffix_mlp)
        else:
            continue
        setattr(sub, _BACKEND, backend)
        count += 1
    return count


def use_fused_kernels(model: nn.Module, trained_layers: list[int] | None, backend: str = "auto",
                      suffix_mlp: str = "recompute") -> int:
    """Fused norms/MLPs in the trained layers, the layers above the lowest one and the final norm
    (all layers for trained_layers=None); return the number of patched modules."""
    if suffix_mlp not in SUFFIX_MLP_MODES:
        raise ValueError(f"suffix_mlp must be one of {SUFFIX_MLP_MODES}, got {suffix_mlp!r}")
    backend = resolve_backend(backend, next(model.parameters()).device)  # a bad name fails now; no per-call resolve
    layers = model.model.layers
    start = 0 if trained_layers is None else min(trained_layers)
    count = sum(_patch(layers[i], backend, suffix_mlp) for i in range(start, len(layers)))
    return count + _patch(model.model.norm, backend, suffix_mlp)


def restore_forward(model: nn.Module) -> int:
    """Undo use_fused_kernels: every patched module gets its class's forward back; return how many."""
    count = 0
    for sub in model.modules():
        if hasattr(sub, _BACKEND):
            for name in ("forward", _BACKEND, _MODE):
                sub.__dict__.pop(name, None)
            count += 1
    return count


def patched_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose forward is a fused one (for tests and diagnostics)."""
    return [name for name, sub in model.named_modules() if hasattr(sub, _BACKEND)]
