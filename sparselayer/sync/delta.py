"""Layer-delta codec: what changed since the last weight push, as one safetensors payload.

Each tensor travels in bfloat16, either dense or, when smaller, as the flat indices (int32, or
int64 past 2^31 elements) and new values of only the elements whose bf16 bits changed. Unchanged
tensors are left out. The sparse work runs in the C++ extension (``sparselayer._C``) when it is
built; ``backend="python"`` selects the torch twin, which gives byte-identical payloads.

Payload: safetensors with tensors ``"<i>"`` (dense) or ``"<i>.indices"`` + ``"<i>.values"``
(sparse) and one metadata key ``"sparselayer"`` holding JSON: ``format``, ``base_version`` and per
tensor ``name``, ``shape``, ``encoding``, ``crc`` (CRC-32 of the new bf16 bytes) and, for sparse
entries, ``base_crc`` (of the bf16 bytes the delta applies to).

Decoding trusts nothing in a payload: the header's size, JSON depth and tensor count are capped
(`PayloadLimits`) before any tensor is read, every metadata field is type-checked, and every new
value must be finite. Refusals are one-line `DeltaError`s that name the payload's own entries but
never the served checkpoint's shapes or a Python repr.
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
VERSION_HEADER = "X-Sparselayer-Weights-Version"  # on generation responses: the weights version that produced them
API_KEY_ENV = "SPARSELAYER_API_KEY"  # the server's key (`serve --api-key`) when no flag or field gives one

MAX_DEPTH = 8  # JSON nesting a payload header or its metadata may have (a valid one has 4)
NAME_SHOWN = 120  # characters of a client-given tensor name a refusal repeats

__all__ = ["FORMAT", "HAVE_EXTENSION", "Delta", "PayloadLimits", "encode_delta", "decode_delta", "read_meta",
           "check_header", "check_finite", "sparse_diff", "sparse_apply", "to_bf16", "checkpoint_shapes",
           "load_checkpoint_tensors"]


@dataclass(frozen=True)
class PayloadLimits:
    """Caps on a payload's header, checked before any tensor is read, so that a hostile or broken
    payload costs little (no 300,000 empty tensors, no 100k-deep JSON) whatever it declares."""

    max_tensors: int  # metadata entries: checkpoint tensors one payload may carry
    max_header_bytes: int  # the safetensors header JSON, metadata included
    max_depth: int = MAX_DEPTH  # JSON nesting of the header and of the metadata

    @classmethod
    def for_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> PayloadLimits:
        """Limits any valid payload for a checkpoint of these tensors fits in: every tensor once, sparse
        (two header entries), with room for long names."""
        return cls(max_tensors=len(shapes), max_header_bytes=(64 << 10) + 1024 * len(shapes))


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


def _not_readable() -> DeltaError:
    return DeltaError("delta payload is not a readable safetensors file")


def _json_depth(value) -> int:
    """Nesting depth of parsed JSON (a scalar: 0), walked without recursion."""
    depth, level = 0, [(value, 1)]
    while level:
        node, d = level.pop()
        if isinstance(node, (dict, list)):
            depth = max(depth, d)
            level.extend((child, d + 1) for child in (node.values() if isinstance(node, dict) else node))
    return depth


def _load_json(text: bytes | str, what: str, max_depth: int):
    """Parsed JSON no deeper than `max_depth`; DeltaError (never RecursionError) otherwise."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise DeltaError(f"delta payload {what} is nested deeper than {max_depth} levels") from None
    except (ValueError, TypeError):
        raise _not_readable() if what == "header" else DeltaError(f"delta payload {what} is not JSON") from None
    if _json_depth(value) > max_depth:
        raise DeltaError(f"delta payload {what} is nested deeper than {max_depth} levels")
    return value


def _header(payload: bytes, limits: PayloadLimits | None) -> dict:
    """The payload's safetensors header (tensor entries and `__metadata__`), within `limits`."""
    header_len = int.from_bytes(payload[:8], "little") if len(payload) >= 8 else -1
    if header_len < 2 or header_len > len(payload) - 8:
        raise _not_readable()
    if limits is not None and header_len > limits.max_header_bytes:
        raise DeltaError(f"delta payload header is {header_len} bytes, over the limit of {limits.max_header_bytes}")
    header = _load_json(payload[8 : 8 + header_len], "header", limits.max_depth if limits else MAX_DEPTH)
    if not isinstance(header, dict):
        raise _not_readable()
    return header


def _meta_of(header: dict, limits: PayloadLimits | None) -> dict:
    """The `sparselayer-delta/1` metadata of a parsed header, its shape checked (not its entries)."""
    extra = header.get("__metadata__")
    text = extra.get(META_KEY) if isinstance(extra, dict) else None
    if not isinstance(text, str):
        raise DeltaError(f"delta payload lacks {FORMAT} metadata")
    meta = _load_json(text, "metadata", limits.max_depth if limits else MAX_DEPTH)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("tensors"), list):
        raise DeltaError(f"delta payload lacks {FORMAT} metadata")
    if limits is not None and len(meta["tensors"]) > limits.max_tensors:
        raise DeltaError(f"delta payload lists {len(meta['tensors'])} tensors, over the limit of "
                         f"{limits.max_tensors} (the served checkpoint's tensor count)")
    return meta


def read_meta(payload: bytes, limits: PayloadLimits | None = None) -> dict:
    """The payload's metadata (format, base_version, tensors) from its header alone; DeltaError if none
    (or, given `limits`, if the header is larger, deeper or lists more tensors than they allow)."""
    return _meta_of(_header(payload, limits), limits)


def _shown(name: str) -> str:
    """A client-given tensor name as a refusal may repeat it: printable, one line, bounded."""
    text = "".join(c if c.isprintable() else "?" for c in name[:NAME_SHOWN])
    return text + ("..." if len(name) > NAME_SHOWN else "")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry(i: int, entry) -> None:
    """Metadata entry `i` has the fields and types of the format (its values are checked on decode)."""
    if not isinstance(entry, dict):
        raise DeltaError(f"delta entry {i} is not an object")
    if not isinstance(entry.get("name"), str):
        raise DeltaError(f"delta entry {i}: name is not a string")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise DeltaError(f"delta entry {i}: shape is not a list of non-negative integers")
    if entry.get("encoding") not in ("dense", "sparse"):
        raise DeltaError(f"delta entry {i}: encoding is neither dense nor sparse")
    for key in ("crc", "base_crc") if entry["encoding"] == "sparse" else ("crc",):
        if not _is_int(entry.get(key)):
            raise DeltaError(f"delta entry {i}: {key} is not an integer")


def _check_tensor_keys(header: dict, meta: dict, limits: PayloadLimits | None) -> None:
    """The payload holds exactly the tensors its entries describe (before any is read)."""
    keys = set(header) - {"__metadata__"}
    if limits is not None and len(keys) > 2 * limits.max_tensors:
        raise DeltaError(f"delta payload holds {len(keys)} tensors, over the limit of {2 * limits.max_tensors}")
    expected = set()
    for i, entry in enumerate(meta["tensors"]):
        _check_entry(i, entry)
        expected |= {str(i)} if entry["encoding"] == "dense" else {f"{i}.indices", f"{i}.values"}
    if keys - expected:
        raise DeltaError("delta payload holds tensors its metadata does not describe")


def check_header(payload: bytes, limits: PayloadLimits | None = None) -> dict:
    """Validate everything the header says (size, depth, counts, entry types, tensor keys) and return the
    metadata; cheap, and done before any tensor data is touched."""
    header = _header(payload, limits)
    meta = _meta_of(header, limits)
    base_version = meta.get("base_version")
    if not _is_int(base_version):
        raise DeltaError("delta payload metadata lacks an integer base_version")
    _check_tensor_keys(header, meta, limits)
    return meta


def check_finite(name: str, t: torch.Tensor) -> None:
    """DeltaError unless every value of `t` is finite: one NaN or Inf pushed would poison the served model
    for good. aminmax propagates NaN and keeps +-Inf, and runs at memory speed (no bool temporary)."""
    if t.numel() and not all(bool(torch.isfinite(v)) for v in torch.aminmax(t.reshape(-1))):
        raise DeltaError(f"delta tensor {name} holds NaN or Inf values")


def _read_payload(payload: bytes, limits: PayloadLimits | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Checked metadata and raw tensors of a payload; DeltaError if it is not one."""
    meta = check_header(payload, limits)
    try:
        raw = st_load(payload)
    except (SafetensorError, ValueError, TypeError, OverflowError):
        raise _not_readable() from None
    return meta, raw


def decode_delta(payload: bytes, shapes: Mapping[str, tuple[int, ...]],
                 base_of: Callable[[str], torch.Tensor], version: int | None = None,
                 backend: str | None = None, limits: PayloadLimits | None = None) -> Delta:
    """Check every entry of `payload` against the model's `shapes`, the current `version` and the bases
    (`base_of(name)`, bf16) and return the new tensors; DeltaError on the first problem, nothing applied.

    `limits` caps the header (default: `PayloadLimits.for_shapes(shapes)`); every new value must be finite.
    """
    meta, raw = _read_payload(payload, limits or PayloadLimits.for_shapes(shapes))
    base_version = meta["base_version"]
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
    """One validated, finite new tensor of the payload (entry fields already type-checked)."""
    name = entry["name"]
    if name not in shapes:
        raise DeltaError(f"delta names unknown tensor '{_shown(name)}' (not in the served model's checkpoint)")
    shape = tuple(shapes[name])
    if tuple(entry["shape"]) != shape:
        raise DeltaError(f"delta tensor {name} has shape unlike the served checkpoint's tensor")
    if entry["encoding"] == "dense":
        t = raw.get(key)
        if t is None or t.dtype != torch.bfloat16 or tuple(t.shape) != shape:
            raise DeltaError(f"delta tensor {name}: dense data missing, not bfloat16 or not of the entry's shape")
        check_finite(name, t)
    else:
        t = _decode_sparse(name, key, entry, raw, base_of(name), backend)
    if crc(t) != entry["crc"]:
        raise DeltaError(f"delta tensor {name}: checksum mismatch (corrupted values)")
    return name, t


def _decode_sparse(name: str, key: str, entry: dict, raw: Mapping[str, torch.Tensor], base: torch.Tensor,
                   backend: str | None) -> torch.Tensor:
    """Base with the entry's sparse values written in, after checking the base is the one it was built on
    and that the new values are finite (the base is: the checkpoint's, or an earlier checked push)."""
    if crc(base) != entry["base_crc"]:
        raise DeltaError(f"delta tensor {name} was built on other weights than the server holds (base checksum)")
    idx, val = raw.get(key + ".indices"), raw.get(key + ".values")
    if idx is None or val is None:
        raise DeltaError(f"delta tensor {name}: sparse indices or values missing")
    if val.dtype == torch.bfloat16:
        check_finite(name, val)
    try:
        return sparse_apply(base, idx, val, backend)
    except ValueError:
        raise DeltaError(f"delta tensor {name}: sparse indices out of range, not increasing or not int32/int64, "
                         "or values not bfloat16 of the same length") from None


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
