"""Serve a model to vLLM's CPU attention, which only takes head sizes 32, 64, 80, ...: pad smaller heads.

A head of size d becomes a head of size D (a multiple of d) that computes exactly the same
attention: original dim i of each rotary half moves to position (D/d)*i of the padded half (same
rotary frequency), every other position holds zeros, and the query is rescaled so that the
softmax scale D^-0.5 still acts as d^-0.5 (for Qwen3 through q_norm, whose RMS over the zero
padding grows by sqrt(D/d)). The embedded default model (head size 16) runs in vLLM this way.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM 0.32 CPU_ATTN
PADDABLE_TYPES = ("qwen3", "llama")  # their vLLM classes read head_dim from the config (qwen2 does not)
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


@dataclass(frozen=True)
class HeadPadding:
    """Pads attention heads of size `head_dim` to `padded` in checkpoint tensors."""

    head_dim: int
    padded: int
    qk_norm: bool  # Qwen3: per-head RMSNorm on q and k

    def positions(self) -> torch.Tensor:
        """Where the original dims of one head land inside the padded head (rotate-half layout)."""
        d, D = self.head_dim, self.padded
        f, half = D // d, torch.arange(d // 2)
        return torch.cat([f * half, D // 2 + f * half])

    def _pad(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Split `dim` into heads and pad each head with zeros at the non-mapped positions."""
        shape = list(t.shape)
        heads = shape[dim] // self.head_dim
        t = t.reshape(shape[:dim] + [heads, self.head_dim] + shape[dim + 1:])
        out = t.new_zeros(shape[:dim] + [heads, self.padded] + shape[dim + 1:])
        out.index_copy_(dim + 1, self.positions().to(t.device), t)
        return out.reshape(shape[:dim] + [heads * self.padded] + shape[dim + 1:])

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The padded form of one checkpoint tensor (tensors outside attention pass unchanged)."""
        query_scale = math.sqrt(self.padded / self.head_dim)
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            out = self._pad(tensor, 0)
            return out if self.qk_norm else out * query_scale
        if name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight",
                          "self_attn.v_proj.bias", "self_attn.k_norm.weight")):
            return self._pad(tensor, 0)
        if name.endswith("self_attn.q_norm.weight"):
            return self._pad(tensor, 0) / query_scale
        if name.endswith("self_attn.o_proj.weight"):
            return self._pad(tensor, 1)
        return tensor


def head_dim_of(config: dict) -> int:
    """Attention head size of an HF config (explicit head_dim, else hidden / heads)."""
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def plan_padding(config: dict, device_type: str) -> tuple[HeadPadding | None, str | None]:
    """(padding to apply or None, reason vLLM cannot serve the model or None)."""
    d = head_dim_of(config)
    if device_type != "cpu" or d in CPU_HEAD_SIZES:
        return None, None
    target = next((D for D in CPU_HEAD_SIZES if D > d and D % d == 0 and d % 2 == 0), None)
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if target is None or config.get("model_type") not in PADDABLE_TYPES or rope_type != "default":
        return None, (f"vLLM's CPU attention does not support head size {d} of this "
                      f"{config.get('model_type')} model (supported: {', '.join(map(str, CPU_HEAD_SIZES))})")
    return HeadPadding(d, target, config.get("model_type") == "qwen3"), None


@dataclass(frozen=True)
class ServingPlan:
    """How vLLM serves a model folder on a device: its config.json, the head padding, or why it cannot."""

    config: dict
    padding: HeadPadding | None
    problem: str | None  # None: vLLM can serve the model (padded when `padding` is set)


def plan_serving(folder: Path, device_type: str) -> ServingPlan:
    """Read `folder`'s config.json once and plan its head padding for `device_type` ("cpu", "cuda")."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return ServingPlan(config, *plan_padding(config, device_type))


def write_padded_model(folder: Path, padding: HeadPadding) -> Path:
    """A temporary copy of `folder` with padded heads (config, weights, tokenizer) for vLLM to load."""
    from safetensors.torch import load_file, save_file

    out = Path(tempfile.mkdtemp(prefix="sparselayer-vllm-"))
    config = json.loads((folder / "config.json").read_text())
    config["head_dim"] = padding.padded
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update({n: padding.apply(n, t).contiguous() for n, t in load_file(file).items()})
    save_file(tensors, out / "model.safetensors")
    for name in COPIED_FILES:
        if (folder / name).is_file():
            shutil.copy(folder / name, out / name)
    return out
