"""Layer-delta codec: what changed since the last weight push, as one safetensors payload.

Each tensor travels in bfloat16, either dense or, when smaller, as the flat indices (int32, or
int64 past 2^31 elements) and new values of only the elements whose bf16 bits changed. Unchanged
tensors are left out. The sparse work runs in the C++ extension (``sparselayer._C``) when it is
built; ``backend="python"`` selects the torch twin, which gives byte-identical payloads.

Payload: safetensors with tensors ``"<i>"`` (dense) or ``"<i>.indices"`` + ``"<i>.values"``
(sparse) and one metadata key ``"sparselayer"`` holding JSON: ``format``, ``base_version`` and per
tensor ``name``, ``shape``, ``encoding``, ``crc`` (CRC-32 of the new bf16 bytes) and, for sparse
entries, ``base_crc`` (of the bf16 bytes the delta applies to).
"""
from __future__ import annotations

import importlib
import json
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import DeltaError

try:  # by name: static import graphs would read `from sparselayer import _C` as importing the root package
    _C = importlib.import_module("sparselayer._C")
except ImportError:  # extension not built: the torch twin does the work
    _C = None

HAVE_EXTENSION: bool = _C is not None and hasattr(_C, "delta_encode")
FORMAT = "sparselayer-delta/1"
META_KEY = "sparselayer"
WIDE_LIMIT = 2**31 - 1  # above this many elements indices are int64
DELTA_ROUTE = "/sparselayer/delta"  # where `sparselayer serve` takes payloads
HEALTH_ROUTE = "/sparselayer/health"  # its model, weights version and served model name

__all__ = ["FORMAT", "HAVE_EXTENSION", "Delta", "encode_delta", "decode_delta", "read_meta", "sparse_diff",
           "sparse_apply", "to_bf16", "checkpoint_shapes", "load_checkpoint_tensors"]


def _use_cpp(backend: str | None) -> bool:
    """C++ when built unless the caller asks for "python"; "cpp" without the extension is an error."""
    if backend not in (None, "cpp", "python"):
        raise ValueError(f"unknown delta backend {backend!r}")
    if backend == "cpp" and not HAVE_EXTENSION:
        raise RuntimeError("sparselayer._C with the delta codec is not built")
    return HAVE_EXTENSION if backend is None else backend == "cpp"


def to_bf16(t: torch.Tensor, copy: bool = False) -> torch.Tensor:
    """`t` as contiguous CPU bfloat16, the form every push travels in (`copy`: never shares memory with `t`)."""
    return t.detach().to(device="cpu", dtype=torch.bfloat16, copy=copy).contiguous()


def _bits(t: torch.Tensor) -> np.ndarray:
    """Flat int16 numpy view of a contiguous bf16 tensor's bits (shares memory)."""
    return t.reshape(-1).view(torch.int16).numpy()


def crc(t: torch.Tensor) -> int:
    """CRC-32 of a bf16 tensor's bytes, to catch a wrong base or corrupted values."""
    return zlib.crc32(_bits(t).data)


def sparse_diff(old: torch.Tensor, new: torch.Tensor,
                backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(flat indices, new bf16 values) of the elements whose bits differ, or None if dense is no larger."""
    wide = new.numel() > WIDE_LIMIT
    if _use_cpp(backend):
        out = _C.delta_encode(_bits(old), _bits(new), wide)
        if out is None:
            return None
        return torch.from_numpy(out[0]), torch.from_numpy(out[1]).view(torch.bfloat16)
    a, b = old.reshape(-1).view(torch.int16), new.reshape(-1).view(torch.int16)
    changed = a != b
    count = int(changed.sum())
    if count * ((8 if wide else 4) + 2) >= new.numel() * 2:
        return None
    idx = changed.nonzero().squeeze(1).to(torch.int64 if wide else torch.int32)
    return idx, new.reshape(-1)[idx.long()]  # advanced indexing copies already


def sparse_apply(base: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                 backend: str | None = None) -> torch.Tensor:
    """A copy of `base` (bf16) with `values` written at flat `indices`; ValueError on bad indices."""
    if indices.dim() != 1 or values.dim() != 1 or len(indices) != len(values):
        raise ValueError("sparse indices and values must be 1-D of equal length")
    if indices.dtype not in (torch.int32, torch.int64) or values.dtype != torch.bfloat16:
        raise ValueError("sparse indices must be int32/int64 and values bfloat16")
    out = torch.from_numpy(_bits(base.contiguous()).copy()).view(torch.bfloat16).reshape(base.shape)  # numpy: fast copy
    if _use_cpp(backend):
        _C.delta_apply(_bits(out), indices.numpy(), _bits(values.contiguous()))
        return out
    idx = indices.long()
    n = out.numel()
    if len(idx) and (int(idx[0]) < 0 or int(idx[-1]) >= n or bool((idx[1:] <= idx[:-1]).any())):
        bad = idx[(idx < 0) | (idx >= n)]
        shown = int(bad[0]) if len(bad) else int(idx[1:][idx[1:] <= idx[:-1]][0])
        raise ValueError(f"sparse index {shown} out of range or not increasing (size {n})")
    out.view(-1)[idx] = values
    return out


def encode_delta(new: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                 base: Mapping[str, torch.Tensor], base_version: int, backend: str | None = None) -> bytes:
    """Payload of the tensors in `new` that differ from `base` (same names; missing there: dense)."""
    items = sorted(new.items() if isinstance(new, Mapping) else new, key=lambda kv: kv[0])
    tensors: dict[str, torch.Tensor] = {}
    entries: list[dict] = []
    for name, value in items:
        t, old = to_bf16(value), base.get(name)
        diff = sparse_diff(to_bf16(old), t, backend) if old is not None and old.shape == t.shape else None
        if diff is not None and len(diff[0]) == 0:
            continue  # unchanged since the last push
        key = str(len(entries))
        entry = {"name": name, "shape": list(t.shape), "crc": crc(t)}
        if diff is None:
            entry["encoding"], tensors[key] = "dense", t
        else:
            entry["encoding"], entry["base_crc"] = "sparse", crc(to_bf16(old))
            tensors[key + ".indices"], tensors[key + ".values"] = diff
        entries.append(entry)
    meta = {"format": FORMAT, "base_version": int(base_version), "tensors": entries}
    return st_save(tensors, metadata={META_KEY: json.dumps(meta, separators=(",", ":"))})


@dataclass
class Delta:
    """A decoded payload: the full new bf16 tensors, ready to load, and the version they build on."""

    base_version: int
    tensors: dict[str, torch.Tensor]
    encodings: dict[str, str] = field(default_factory=dict)  # name -> "dense" | "sparse"


def read_meta(payload: bytes) -> dict:
    """The payload's metadata (format, base_version, tensors) from its header alone; DeltaError if none."""
    try:
        header_len = int.from_bytes(payload[:8], "little")
        meta_text = json.loads(payload[8 : 8 + header_len]).get("__metadata__", {}).get(META_KEY)
        meta = json.loads(meta_text) if meta_text else None
    except (ValueError, TypeError, AttributeError) as exc:
        raise DeltaError(f"delta payload is not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("tensors"), list):
        raise DeltaError(f"delta payload lacks {FORMAT} metadata")
    return meta


def _read_payload(payload: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """Metadata and raw tensors of a payload; DeltaError if it is not one."""
    try:
        raw = st_load(payload)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise DeltaError(f"delta payload is not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    return read_meta(payload), raw


def decode_delta(payload: bytes, shapes: Mapping[str, tuple[int, ...]],
                 base_of: Callable[[str], torch.Tensor], version: int | None = None,
                 backend: str | None = None) -> Delta:
    """Check every entry of `payload` against the model's `shapes`, the current `version` and the bases
    (`base_of(name)`, bf16) and return the new tensors; DeltaError on the first problem, nothing applied."""
    meta, raw = _read_payload(payload)
    base_version = meta.get("base_version")
    if not isinstance(base_version, int) or isinstance(base_version, bool):
        raise DeltaError("delta payload metadata lacks an integer base_version")
    if version is not None and base_version != version:
        raise DeltaError(f"delta built on weights version {base_version}, but the server is at version {version}")
    delta = Delta(base_version, {})
    for i, entry in enumerate(meta["tensors"]):
        name, t = _decode_entry(str(i), entry, raw, shapes, base_of, backend)
        if name in delta.tensors:
            raise DeltaError(f"delta names tensor {name} twice")
        delta.tensors[name], delta.encodings[name] = t, entry["encoding"]
    return delta


def _decode_entry(key: str, entry: dict, raw: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]],
                  base_of: Callable[[str], torch.Tensor], backend: str | None) -> tuple[str, torch.Tensor]:
    """One validated new tensor of the payload."""
    name = entry.get("name") if isinstance(entry, dict) else None
    if name not in shapes:
        raise DeltaError(f"delta names unknown tensor {name!r} (not in the served model's checkpoint)")
    shape = tuple(shapes[name])
    if tuple(entry.get("shape") or ()) != shape:
        raise DeltaError(f"delta tensor {name} has shape {tuple(entry.get('shape') or ())}, the model's is {shape}")
    encoding = entry.get("encoding")
    if encoding == "dense":
        t = raw.get(key)
        if t is None or t.dtype != torch.bfloat16 or tuple(t.shape) != shape:
            raise DeltaError(f"delta tensor {name}: dense data missing or not bfloat16 of shape {shape}")
    elif encoding == "sparse":
        t = _decode_sparse(name, key, entry, raw, base_of(name), backend)
    else:
        raise DeltaError(f"delta tensor {name}: unknown encoding {encoding!r}")
    if crc(t) != entry.get("crc"):
        raise DeltaError(f"delta tensor {name}: checksum mismatch (corrupted values)")
    return name, t


def _decode_sparse(name: str, key: str, entry: dict, raw: Mapping[str, torch.Tensor], base: torch.Tensor,
                   backend: str | None) -> torch.Tensor:
    """Base with the entry's sparse values written in, after checking the base is the one it was built on."""
    if crc(base) != entry.get("base_crc"):
        raise DeltaError(f"delta tensor {name} was built on other weights than the server holds (base checksum)")
    idx, val = raw.get(key + ".indices"), raw.get(key + ".values")
    if idx is None or val is None:
        raise DeltaError(f"delta tensor {name}: sparse indices or values missing")
    try:
        return sparse_apply(base, idx, val, backend)
    except ValueError as exc:
        raise DeltaError(f"delta tensor {name}: {exc}") from None


def _shard_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a Hugging Face model folder."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise DeltaError(f"{model_dir} holds no *.safetensors weights")
    return files


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, read from the safetensors headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in _shard_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def load_checkpoint_tensors(model_dir: str | Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named checkpoint tensors of a model folder, as bf16 (the base of the first sparse delta)."""
    wanted, out = set(names), {}
    for path in _shard_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in wanted.intersection(f.keys()):
                out[name] = to_bf16(f.get_tensor(name))
    return out
