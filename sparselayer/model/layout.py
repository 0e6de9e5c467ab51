"""Load a local HF causal LM, pick the trained decoder layers, and freeze everything else.

Frozen parameters get requires_grad=False: autograd then never allocates their gradients and the
optimizer never sees them, so only the trained layer(s) carry gradient and optimizer state.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..data import DEFAULT_MODEL_DIR
from ..errors import ConfigError, ModelError, first_line
from .layer_select import is_selection, select_layers

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU (exact and fast enough there) and bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def resolve_attn(attn: str, device: torch.device) -> str:
    """flash-attn when it is installed and the model runs on CUDA, PyTorch SDPA otherwise."""
    if attn != "auto":
        return attn
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def check_model_dir(path: str | Path | None) -> Path:
    """The model folder to load (the embedded default for None), after checking it is a supported causal LM."""
    folder = Path(path) if path else DEFAULT_MODEL_DIR
    if not folder.exists():
        raise ModelError(f"model path does not exist: {folder}")
    config_file = folder / "config.json"
    if not folder.is_dir() or not config_file.is_file():
        raise ModelError(f"{folder} is not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(f"{config_file} is not valid JSON") from None
    if not isinstance(config, dict):
        raise ModelError(f"{config_file} does not hold a model configuration (a JSON object)")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"unsupported architecture {model_type!r} in {folder}: "
                         f"supported are {', '.join(SUPPORTED_MODEL_TYPES)} causal LMs")
    if not any(a.endswith("ForCausalLM") for a in config.get("architectures") or [model_type + "ForCausalLM"]):
        raise ModelError(f"{folder} is not a causal LM (architectures: {config.get('architectures')})")
    if not list(folder.glob("*.safetensors")):
        raise ModelError(f"{folder} holds no .safetensors weights")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{folder} holds no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})")
    return folder


def load_model(path: str | Path | None, dtype: str = "auto", device: str = "auto",
               attn_implementation: str = "auto") -> tuple[nn.Module, object]:
    """Load model and tokenizer from a local folder (nothing is downloaded), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = check_model_dir(path)
    dev = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, padding_side="left")
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=resolve_dtype(dtype, dev),
            attn_implementation=resolve_attn(attn_implementation, dev), output_loading_info=True,
            ignore_mismatched_sizes=True)  # reported by check_weights_cover, one line
    except Exception as exc:  # corrupt weights, shape mismatches, tokenizer errors: all input problems here
        raise ModelError(f"could not load model from {folder}: {first_line(exc) or type(exc).__name__}") from None
    check_weights_cover(folder, info)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(dev).eval(), tokenizer


def check_weights_cover(folder: Path, info: dict[str, list]) -> None:
    """ModelError when the weights do not cover what config.json declares: transformers would otherwise
    initialise the missing tensors (a layer config.json declares but the weights lack) at random, silently."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        name, found, wanted = mismatched[0][:3]
        raise ModelError(f"{folder}: weight {name} has shape {tuple(found)} but config.json implies {tuple(wanted)}")
    if missing:
        layers = sorted({int(m[1]) for name in missing if (m := re.search(r"\.layers\.(\d+)\.", name))})
        what = (f"decoder layer{'s' if len(layers) > 1 else ''} {_span(layers)}" if layers else
                f"{len(missing)} tensor{'s' if len(missing) > 1 else ''} ({missing[0]}, ...)")
        raise ModelError(f"{folder}: the weights lack {what} that config.json declares "
                         f"({len(missing)} missing tensors; nothing is initialised at random)")


def _span(layers: list[int]) -> str:
    """'4-5' for consecutive layer indices, else '2,7'."""
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))



def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer stack of a Qwen/Llama-family causal LM."""
    return model.model.layers


def parse_layers(spec: str, num_layers: int, ranking: Sequence[int] | None = None) -> list[int] | None:
    """Trained layer indices from "16", "-1", "14-18", "10,16", "mid:5", "top:3" (the best of `ranking`,
    layer indices best first: `sparselayer.contributions.resolve_layers` reads it from a sweep CSV);
    None means "all" (every parameter)."""
    spec = str(spec).strip().lower()
    if spec == "all":
        return None
    if is_selection(spec):
        return select_layers(spec, num_layers, ranking)
    picked: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            span = re.fullmatch(r"(\d+)-(\d+)", part)
            if span:
                lo, hi = int(span[1]), int(span[2])
                if hi < lo:
                    raise ValueError
                picked.extend(range(lo, hi + 1))
            else:
                picked.append(int(part))
    except ValueError:
        raise ConfigError(f"--layers {spec!r} is not a layer list (examples: 16, -1, 14-18, 10,16, all)") from None
    if not picked:
        raise ConfigError("--layers is empty")
    resolved = []
    for k in picked:
        if not -num_layers <= k < num_layers:
            raise ConfigError(f"layer {k} is out of range: the model has {num_layers} decoder layers "
                              f"(valid: 0..{num_layers - 1} or -{num_layers}..-1)")
        resolved.append(k % num_layers)
    return sorted(set(resolved))


def freeze_except(model: nn.Module, layers: list[int] | None) -> dict[str, nn.Parameter]:
    """Freeze every parameter outside the trained layers; return the trained ones by checkpoint name."""
    if layers is None:
        trained = dict(model.named_parameters())
    else:
        prefixes = tuple(f"model.layers.{k}." for k in layers)
        trained = {n: p for n, p in model.named_parameters() if n.startswith(prefixes)}
    for name, param in model.named_parameters():
        param.requires_grad_(name in trained)
    return trained


def layers_label(layers: list[int] | None) -> str:
    """Short text for run names and summaries: 'layer16', 'layers10,16', 'all'."""
    if layers is None:
        return "all"
    return f"layer{layers[0]}" if len(layers) == 1 else "layers" + ",".join(map(str, layers))
