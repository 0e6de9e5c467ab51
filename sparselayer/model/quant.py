"""Frozen decoder layers through bitsandbytes: nf4 (4-bit NormalFloat, bf16 compute) or LLM.int8().

Only the nn.Linear modules of the decoder layers that are NOT trained are replaced. The layers below
the trained one run without autograd (the prefix); the layers above it only pass the input gradient
back, which both bitsandbytes layers provide (weights are frozen). Embeddings and the LM head stay
dense: the embedding is a lookup, not a matmul, and the fused log-prob/loss kernel reads the head
weight as a dense matrix (its error would also enter every log-prob directly).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import QUANT_MODES as MODES
from ..config import check_quant_layers
from ..errors import ConfigError


def import_bitsandbytes():
    """bitsandbytes, imported only when a quantized mode is asked for; one clear line when it is missing."""
    # its CPU backend logs a missing optional kernel of the AVX512-BF16 nf4 path, which quantized_linear turns off
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ConfigError(f"--quant nf4/int8 and --optim adamw8bit need bitsandbytes "
                          f"(pip install bitsandbytes): {str(exc).splitlines()[0]}") from None
    return bitsandbytes


def bitsandbytes_available() -> bool:
    """Whether bitsandbytes imports here (without raising)."""
    try:
        import_bitsandbytes()
    except ConfigError:
        return False
    return True


def resolve_quant(mode: str, device: torch.device, layers: list[int] | None) -> str:
    """'auto' is nf4 on CUDA when bitsandbytes imports, else none: on CPU bitsandbytes' kernels are slower
    than a dense fp32 matmul (benchmarks/README.md, quantized frozen layers), and with --layers all
    nothing is frozen."""
    if mode == "auto":
        if layers is None or device.type != "cuda":
            return "none"
        return "nf4" if bitsandbytes_available() else "none"
    if mode not in MODES:
        raise ConfigError(f"--quant must be one of auto, {', '.join(MODES)}, got {mode!r}")
    check_quant_layers(mode, layers is None)
    return mode


def quantize_frozen(model: nn.Module, trained_layers: list[int] | None, mode: str) -> int:
    """Replace the nn.Linear modules of every frozen decoder layer by bitsandbytes ones; return how many."""
    mode = resolve_quant(mode, next(model.parameters()).device, trained_layers)
    if mode == "none":
        return 0
    import_bitsandbytes()
    # LLM.int8() warns on every call that fp32/bf16 inputs are cast to fp16: expected here, not news
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    replaced = 0
    for index, layer in enumerate(model.model.layers):
        if index in trained_layers:
            continue
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, quantized_linear(child, mode))
                    replaced += 1
    return replaced


def quantized_linear(linear: nn.Linear, mode: str) -> nn.Module:
    """A frozen bitsandbytes copy of `linear` on the same device (quantized as it is moved there)."""
    bnb = import_bitsandbytes()
    device, has_bias = linear.weight.device, linear.bias is not None
    weight = linear.weight.detach()
    if mode == "nf4":
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=torch.bfloat16,
                              quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        # bitsandbytes repacks the weight in place for an AVX512-BF16 CPU kernel on the first no-grad
        # eval call; that kernel has no autograd, so a later suffix pass would silently get no input
        # gradient (measured: x.grad None). Keep the one differentiable format for every pass.
        q.support_avx512bf16_for_cpu = False
    elif mode == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                threshold=6.0, device="meta")
        # Int8Params quantize when they leave the CPU (or stay on it): hand them the weight on the CPU
        q.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        raise ConfigError(f"unknown quantization mode {mode!r}")
    if has_bias:
        q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    q = q.to(device)
    q.requires_grad_(False)
    return q.train(linear.training)
