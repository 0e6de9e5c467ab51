"""Layer-delta codec: C++ and torch twins give identical payloads; decode(encode(x)) is exact; bad input refused."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as st_save

from sparselayer.errors import DeltaError
from sparselayer.sync import delta as D

BACKENDS = ["python"] + (["cpp"] if D.HAVE_EXTENSION else [])


def _layer(seed: int = 0) -> dict[str, torch.Tensor]:
    """A fake layer: float32 tensors in checkpoint names."""
    g = torch.Generator().manual_seed(seed)
    return {"model.layers.1.mlp.up_proj.weight": torch.randn(96, 48, generator=g) * 0.02,
            "model.layers.1.self_attn.q_proj.weight": torch.randn(48, 48, generator=g) * 0.02,
            "model.layers.1.input_layernorm.weight": torch.ones(48)}


def _step(layer: dict[str, torch.Tensor], lr: float, seed: int = 1) -> dict[str, torch.Tensor]:
    """The layer after an Adam-like step of size `lr` (every element moves by about lr)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + lr * torch.randn(v.shape, generator=g).sign() for k, v in layer.items()}


def _bf16(tensors):
    return {k: D.to_bf16(v) for k, v in tensors.items()}


def _meta(payload: bytes) -> dict:
    header = json.loads(payload[8 : 8 + int.from_bytes(payload[:8], "little")])
    return json.loads(header["__metadata__"][D.META_KEY])


SHAPES = {k: tuple(v.shape) for k, v in _layer().items()}


@pytest.mark.skipif(not D.HAVE_EXTENSION, reason="sparselayer._C not built")
@pytest.mark.parametrize("lr", [1e-5, 1e-4, 1e-3, 0.1])
def test_cpp_and_python_payloads_identical(lr):
    base, new = _bf16(_layer()), _step(_layer(), lr)
    cpp, py = D.encode_delta(new, base, 7, backend="cpp"), D.encode_delta(new, base, 7, backend="python")
    assert cpp == py
    a = D.decode_delta(cpp, SHAPES, base.__getitem__, 7, backend="cpp")
    b = D.decode_delta(cpp, SHAPES, base.__getitem__, 7, backend="python")
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k].view(torch.int16), b.tensors[k].view(torch.int16)) for k in a.tensors)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lr", [1e-5, 1e-3, 0.1])
def test_roundtrip_exact(backend, lr):
    base, new = _bf16(_layer()), _step(_layer(), lr)
    payload = D.encode_delta(new, base, 0, backend=backend)
    out = D.decode_delta(payload, SHAPES, base.__getitem__, 0, backend=backend).tensors
    for name, value in new.items():
        expected = D.to_bf16(value)
        if torch.equal(expected.view(torch.int16), base[name].view(torch.int16)):
            assert name not in out  # unchanged tensors are left out
        else:
            assert torch.equal(out[name].view(torch.int16), expected.view(torch.int16))


def test_sparse_only_when_smaller():
    base = _bf16(_layer())
    few = _meta(D.encode_delta(_step(_layer(), 1e-5), base, 0))["tensors"]  # most bf16 elements unchanged
    many = _meta(D.encode_delta(_step(_layer(), 0.1), base, 0))["tensors"]
    assert {e["encoding"] for e in few} == {"sparse"}
    assert {e["encoding"] for e in many} == {"dense"}
    assert {e["encoding"] for e in _meta(D.encode_delta(_layer(), {}, 0))["tensors"]} == {"dense"}  # no base
    dense = D.encode_delta(_step(_layer(), 1e-5), {}, 0)
    assert len(D.encode_delta(_step(_layer(), 1e-5), base, 0)) < 0.85 * len(dense)
    assert len(D.encode_delta(_step(_layer(), 1e-6), base, 0)) < 0.3 * len(dense)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_indices(monkeypatch, backend):
    monkeypatch.setattr(D, "WIDE_LIMIT", 10)  # pretend the tensor is past 2^31 elements
    old = D.to_bf16(torch.zeros(64))
    new = old.clone()
    new[[3, 40]] = 1.0
    idx, val = D.sparse_diff(old, new, backend)
    assert idx.dtype == torch.int64 and idx.tolist() == [3, 40] and val.tolist() == [1.0, 1.0]
    assert torch.equal(D.sparse_apply(old, idx, val, backend), new)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("indices", [[0, 64], [5, 5], [7, 3], [-1, 2]])
def test_bad_indices_refused(backend, indices):
    base = D.to_bf16(torch.zeros(64))
    with pytest.raises(ValueError, match="out of range or not increasing"):
        D.sparse_apply(base, torch.tensor(indices, dtype=torch.int32), torch.ones(2, dtype=torch.bfloat16), backend)
    assert not base.any()


def _sparse_payload(base, new, version=0):
    payload = D.encode_delta(new, base, version)
    assert "sparse" in {e["encoding"] for e in _meta(payload)["tensors"]}
    return payload


@pytest.mark.parametrize("case, message", [
    ("garbage", "not a readable safetensors"), ("truncated", "not a readable safetensors"),
    ("no_meta", "lacks sparselayer-delta"), ("version", "version 0, but the server is at version 3"),
    ("unknown", "unknown tensor 'model.layers.9.mlp.up_proj.weight'"), ("shape", "has shape"),
    ("base", "built on other weights"), ("values", "checksum mismatch"), ("index", "out of range"),
])
def test_malformed_or_mismatched_refused(case, message):
    base, new = _bf16(_layer()), _step(_layer(), 1e-5)
    payload, shapes, version, bases = _sparse_payload(base, new), dict(SHAPES), 0, dict(base)
    name = "model.layers.1.mlp.up_proj.weight"
    if case == "garbage":
        payload = b"\x00" * 5
    elif case == "truncated":
        payload = payload[:-7]
    elif case == "no_meta":
        payload = st_save({"0": torch.zeros(2, dtype=torch.bfloat16)})
    elif case == "version":
        version = 3
    elif case == "unknown":
        payload = D.encode_delta({"model.layers.9.mlp.up_proj.weight": new[name]}, {}, 0)
    elif case == "shape":
        shapes[name] = (48, 96)
    elif case == "base":
        bases[name] = D.to_bf16(base[name].float() + 1)
    else:
        raw, meta = _raw(payload)
        key = next(str(i) for i, e in enumerate(meta["tensors"]) if e["encoding"] == "sparse")
        if case == "values":
            raw[key + ".values"] = raw[key + ".values"] + 1
        else:
            raw[key + ".indices"][-1] = 10**6
        payload = st_save(raw, metadata={D.META_KEY: json.dumps(meta)})
    with pytest.raises(DeltaError, match=message):
        D.decode_delta(payload, shapes, bases.__getitem__, version)


def _raw(payload):
    from safetensors.torch import load

    return dict(load(payload)), _meta(payload)


def test_checkpoint_helpers(tmp_path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in _layer().items()}, str(tmp_path / "model.safetensors"))
    assert D.checkpoint_shapes(tmp_path) == SHAPES
    got = D.load_checkpoint_tensors(tmp_path, ["model.layers.1.input_layernorm.weight", "missing"])
    assert list(got) == ["model.layers.1.input_layernorm.weight"] and got[
        "model.layers.1.input_layernorm.weight"].dtype == torch.bfloat16
    with pytest.raises(DeltaError, match="no \\*.safetensors"):
        D.checkpoint_shapes(tmp_path / "nothing")
