"""Shared fixtures: tiny random models built from a config (nothing is downloaded)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SPARSELAYER_AUTO_ROLLOUT", "hf")  # --rollout auto: no vLLM engine unless a test asks
if not torch.cuda.is_available():  # before any test module imports triton (transformers does): the Triton
    os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels' tests run them in the interpreter on CPU
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def make_tiny_model(folder: Path, num_layers: int = 4, hidden: int = 32, seed: int = 0,
                    model_type: str = "qwen3") -> Path:
    """Save a random tiny causal LM of the given family with the character tokenizer into `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from sparselayer.data.make_default_model import build_tokenizer

    tok = build_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    kinds = {"qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": hidden // 4}),
             "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}), "llama": (LlamaConfig, LlamaForCausalLM, {})}
    config_cls, model_cls, extra = kinds[model_type]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**common, **extra))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def load_benchmark(name: str):
    """benchmarks/<name>.py imported as the module `name` (the benchmarks are scripts, not a package)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 4-layer, hidden-32 random Qwen3 with the character tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def vllm_engine(tmp_path_factory):
    """ONE in-process vLLM engine for the whole session, on a 4-layer hidden-64 Qwen3 (head size 16, padded)."""
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer

    from sparselayer.rollout.vllm_engine import VLLMRolloutEngine

    folder = make_tiny_model(tmp_path_factory.mktemp("vllm") / "model", hidden=64)
    _tie_embeddings(folder)  # like the embedded default: vLLM's tied LM head must follow embedding pushes
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    engine = VLLMRolloutEngine(folder, tokenizer, torch.float32, "cpu", max_model_len=64)
    yield engine
    engine.close()


def _tie_embeddings(folder: Path) -> None:
    """Turn a saved model into one whose LM head is its input embedding (the HF way: no lm_head tensor)."""
    import json

    from safetensors.torch import load_file, save_file

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}, indent=2))
    tensors = load_file(folder / "model.safetensors")
    tensors.pop("lm_head.weight", None)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture
def sandbox_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """For sandbox tests: TMPDIR (and tempfile's cached choice) pointed at a folder of the test's, checked empty
    afterwards."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    assert list(folder.iterdir()) == [], "a sandbox directory was left behind"
