"""Remote mode: `sparselayer serve` (real vLLM CPU build, separate process) takes layer deltas over HTTP.

One server per session, started with the CLI on 127.0.0.1, a free port and an API key (KEY), shared
with tests/test_serve_security.py through `shared_server`. The tests leave it in a known state: only
layer 2 is ever pushed, and every client re-reads the server's version.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import make_tiny_model

from sparselayer.errors import DataError, DeltaError, RemoteError
from sparselayer.sync import delta as D

LAYER = "model.layers.2."
SEQUENCE = list(range(5, 25))  # a fixed token sequence for prompt log-probs
KEY = "sl-test-4f1c9a0e7b"  # the session server's --api-key
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_TIMEOUT = 5  # the session server's --body-timeout (s): short for the slow-body test, ample for local pushes
_SERVER: dict = {}  # the session's one server: url, model, process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 400.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sparselayer serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + D.HEALTH_ROUTE, headers=AUTH, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"sparselayer serve not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def shared_server(request) -> tuple[str, Path]:
    """(url, model folder) of THE `sparselayer serve` process of the session (any module's fixture starts it
    on first use; it stops when pytest ends). Key KEY, body timeout BODY_TIMEOUT, other limits default."""
    if "url" not in _SERVER:
        pytest.importorskip("vllm")
        root = request.getfixturevalue("tmp_path_factory").mktemp("serve")
        model = make_tiny_model(root / "model", hidden=64)  # head size 16: served with heads padded to 32
        port, log = _free_port(), root / "server.log"
        cmd = [sys.executable, "-m", "sparselayer.cli", "serve", "--model", str(model), "--port", str(port),
               "--max-model-len", "64", "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20),
               "--api-key", KEY, "--body-timeout", str(BODY_TIMEOUT)]
        env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        request.config.add_cleanup(lambda: _stop(proc))
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, log)
        assert httpx.get(url + D.HEALTH_ROUTE, headers=AUTH).json()["padded_heads"]
        _SERVER.update(url=url, model=model, proc=proc)
    return _SERVER["url"], _SERVER["model"]


@pytest.fixture(scope="session")
def server(request):
    """(url, model folder) of the session's `sparselayer serve`."""
    return shared_server(request)


@pytest.fixture(scope="session")
def tokenizer(server):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(server[1])


def _engine(server, tokenizer):
    from sparselayer.rollout.remote import RemoteRolloutEngine

    return RemoteRolloutEngine(server[0], tokenizer, base_model=server[1], api_key=KEY)


def clean_refusal(resp: httpx.Response, status: int) -> str:
    """The refusal's one-line message, after checking it is `status` JSON with no internal detail in it: no
    path, no shape, no Python repr, no traceback."""
    assert resp.status_code == status, resp.text[:300]
    error = resp.json()["error"]
    assert isinstance(error, str) and "\n" not in error and len(error) < 300, error
    assert _SERVER.get("model") is None or str(_SERVER["model"]) not in error
    for leak in ("/tmp", "Traceback", "torch.Size", "(64,", "[64", "', '", "{'", "['", "<class", "Error:"):
        assert leak not in error, error
    return error


def _hf_logprobs(model_dir: Path, layer: dict[str, torch.Tensor], token_ids: list[int]) -> torch.Tensor:
    """transformers' log-probs of the bf16-rounded model with `layer` loaded (float32 compute)."""
    from transformers import AutoModelForCausalLM

    from sparselayer.sync.check import trainer_logprobs

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = {**model.state_dict(), **{k: v.float() for k, v in layer.items()}}
    model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in state.items()})
    return trainer_logprobs(model, token_ids)


def _layer(model_dir: Path) -> dict[str, torch.Tensor]:
    names = [n for n in D.checkpoint_shapes(model_dir) if n.startswith(LAYER)]
    return D.load_checkpoint_tensors(model_dir, names)


@pytest.mark.slow
def test_sparse_push_changes_generations_to_the_new_weights(server, tokenizer):
    url, model_dir = server
    engine = _engine(server, tokenizer)
    original = _layer(model_dir)
    engine.update_weights(original.items())  # a known starting point whatever ran before
    before = engine.generate(["12+34="], 4, 8, seed=3)
    changed = {}
    g = torch.Generator().manual_seed(0)
    for name, t in original.items():  # 5% of each matrix's elements move a lot: sparse, and visible
        mask = torch.rand(t.shape, generator=g) < 0.05 if t.dim() == 2 else torch.zeros(t.shape, dtype=torch.bool)
        changed[name] = t.float() + mask * 0.5
    sent = engine.update_weights(changed.items())
    dense_bytes = sum(t.numel() * 2 for n, t in changed.items() if changed[n].dim() == 2)
    assert engine.last_push["sparse"] and sent < 0.5 * dense_bytes
    served = torch.tensor(engine.prompt_logprobs(SEQUENCE))
    expected = _hf_logprobs(model_dir, changed, SEQUENCE)
    assert (served - expected).abs().max() < 0.05
    assert (served - _hf_logprobs(model_dir, original, SEQUENCE)).abs().max() > 0.2  # the push mattered
    after = engine.generate(["12+34="], 4, 8, seed=3)
    # near-uniform tiny model: the same seed may well sample the same tokens, but never with the same log-probs
    assert after.sampling_logprobs != before.sampling_logprobs
    for ids, logps in zip(after.completion_ids, after.sampling_logprobs):  # sampled from the new weights
        full = tokenizer("12+34=", add_special_tokens=False)["input_ids"] + ids
        ref = _hf_logprobs(model_dir, changed, full)[-len(ids):]
        assert (torch.tensor(logps) - ref).abs().max() < 0.05
    engine.update_weights(original.items())  # back to the checkpoint, sparse again
    assert engine.last_push["sparse"]
    assert (torch.tensor(engine.prompt_logprobs(SEQUENCE)) - served).abs().max() > 0.2
    params = {k: v.clone() for k, v in original.items()}  # bf16 parameters an optimizer updates in place
    assert engine.update_weights(params.items()) == 0  # nothing changed since the last push: nothing sent
    name = LAYER + "mlp.up_proj.weight"
    params[name].view(-1)[:5] += 1
    assert engine.update_weights(params.items()) > 0 and engine.last_push["tensors"] == [name]
    served = torch.tensor(engine.prompt_logprobs(SEQUENCE))  # one shard of fused gate_up_proj: the rest kept
    assert (served - _hf_logprobs(model_dir, params, SEQUENCE)).abs().max() < 0.05
    params[name].view(-1)[:5] -= 1
    assert engine.update_weights(params.items()) > 0 and engine.last_push["sparse"] == [name]


@pytest.mark.slow
def test_trainer_pushes_sparse_deltas_and_stays_in_sync(server, tmp_path):
    from helpers import DigitShareTask

    from sparselayer import TrainConfig, Trainer
    from sparselayer.rollout.remote import RemoteRolloutEngine

    url, model_dir = server
    config = TrainConfig.from_mapping({
        "model": str(model_dir), "layers": "2", "rollout_url": url, "rollout_api_key": KEY, "check_sync": True,
        "prompts_per_step": 2, "num_generations": 4, "max_completion_length": 6, "learning_rate": 1e-5,
        "max_steps": 2, "output_dir": str(tmp_path / "run"), "progress": False})
    trainer = Trainer(config, task=DigitShareTask())
    assert isinstance(trainer.engine, RemoteRolloutEngine)
    layer_bf16_bytes = sum(p.numel() * 2 for p in trainer.trained.values())
    assert trainer.step()["push_bytes"] > 0  # generate on the server, train layer 2, push, check sync
    metrics = trainer.step()  # this push is relative to the last one: sparse at this learning rate
    assert 0 < metrics["push_bytes"] < 0.6 * layer_bf16_bytes
    assert trainer.engine.last_push["sparse"]
    assert trainer.check_sync() < D_TOLERANCE


D_TOLERANCE = 0.1  # bf16 serving vs float32 trainer, as in sparselayer.sync.check


def _logprobs(engine) -> list[float]:
    return engine.prompt_logprobs(SEQUENCE)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["garbage", "truncated", "unknown_name", "wrong_shape", "wrong_version",
                                  "index_out_of_range", "one_bad_tensor"])
def test_bad_delta_refused_and_weights_unchanged(server, tokenizer, case):
    url, model_dir = server
    engine = _engine(server, tokenizer)
    layer = _layer(model_dir)
    engine.update_weights(layer.items())  # a state this client knows: the checkpoint's layer 2
    version = engine.version
    before = _logprobs(engine)
    name = LAYER + "mlp.down_proj.weight"
    moved = {name: layer[name].float() * 2}
    if case == "garbage":
        payload = b"not a delta at all"
    elif case == "truncated":
        payload = D.encode_delta(moved, {}, version)[:-100]
    elif case == "unknown_name":
        payload = D.encode_delta({"model.layers.99.mlp.down_proj.weight": layer[name]}, {}, version)
    elif case == "wrong_shape":
        payload = D.encode_delta({name: layer[name].t().contiguous()}, {}, version)
    elif case == "wrong_version":
        payload = D.encode_delta(moved, {}, version + 5)
    elif case == "index_out_of_range":
        payload = _bad_index_payload(engine, layer, name, version)
    else:  # a valid tensor next to a bad one: nothing at all is applied
        payload = D.encode_delta({**moved, LAYER + "bogus.weight": layer[name]}, {}, version)
    resp = httpx.post(url + D.DELTA_ROUTE, content=payload, headers=AUTH, timeout=60)
    error = clean_refusal(resp, 400)
    assert error.startswith("delta ")
    assert engine.health()["version"] == version
    assert _logprobs(engine) == before


def _bad_index_payload(engine, layer, name, version) -> bytes:
    """A sparse delta against the server's current base whose last index points past the tensor."""
    import json

    from safetensors.torch import load, save

    base = engine.pushed  # what the server holds under layer 2 (pushed by this client)
    new = base[name].clone()
    new.view(-1)[:3] += 1
    payload = D.encode_delta({name: new}, base, version)
    raw = dict(load(payload))
    header = json.loads(payload[8 : 8 + int.from_bytes(payload[:8], "little")])
    raw["0.indices"][-1] = new.numel() + 7
    return save(raw, metadata=header["__metadata__"])


def test_serve_bad_model_folder_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sparselayer.cli", "serve", "--model", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"sparselayer: error: model path does not exist: {tmp_path / 'nope'}"]
    proc = subprocess.run([sys.executable, "-m", "sparselayer.cli", "serve", "--model", ""],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["sparselayer: error: --model is empty: give the folder of the model "
                                                "to serve"]


def test_remote_engine_unreachable_server_is_clear():
    from sparselayer.errors import RemoteError
    from sparselayer.rollout.remote import RemoteRolloutEngine

    engine = RemoteRolloutEngine(f"http://127.0.0.1:{_free_port()}", tokenizer=None, timeout=5)
    with pytest.raises(RemoteError, match="unreachable"):
        engine.update_weights([("x", torch.zeros(2))])
    assert not isinstance(RemoteError("x"), DeltaError)


def test_tied_embedding_push_refused_on_cpu():
    pytest.importorskip("fastapi")
    import json

    from sparselayer.sync.server import DeltaState, refused_tensors

    model = Path(__file__).resolve().parents[1] / "sparselayer" / "data" / "default_model"  # tied embeddings
    state = DeltaState(model, D.checkpoint_shapes(model), refused=refused_tensors(json.loads(
        (model / "config.json").read_text())))
    emb = D.load_checkpoint_tensors(model, ["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    if torch.cuda.is_available():
        pytest.skip("the refusal is CPU-only")
    with pytest.raises(DeltaError, match="tied to the LM head"):
        state.decode(D.encode_delta({"model.embed_tokens.weight": emb.float() + 1}, {}, 0))


def test_remote_engine_resync_forgets_server_state():
    """Setting version to None (or resync()) makes the next push start from the server's state again."""
    from sparselayer.rollout.remote import RemoteRolloutEngine

    engine = RemoteRolloutEngine(f"http://127.0.0.1:{_free_port()}", tokenizer=None, timeout=5)
    engine.sync.version, engine.sync.pushed = 3, {"x": torch.zeros(2)}
    engine.version = None
    assert engine.version is None and engine.pushed == {}
    engine.version = 5
    assert engine.sync.version == 5


@pytest.mark.slow
def test_token_id_prompts_are_sent_as_they_are(server, tokenizer):
    """generate takes text (tokenized as before) or token-id lists (a chat template already applied), and
    records the weights version that produced the completions (the server's response header)."""
    engine = _engine(server, tokenizer)
    ids = tokenizer("12+34=", add_special_tokens=False)["input_ids"]
    by_text = engine.generate(["12+34=", "7*8="], 2, 6, greedy=True)
    by_ids = engine.generate([ids, torch.tensor(tokenizer("7*8=", add_special_tokens=False)["input_ids"])], 2, 6,
                             greedy=True)
    assert by_ids.prompt_ids == by_text.prompt_ids and by_ids.completion_ids == by_text.completion_ids
    assert engine.weights_version == engine.health()["version"]
    for bad in (["ok", [1, "2"]], [[]], [3.5], [[True, 2]]):
        with pytest.raises(DataError, match="neither a string nor a non-empty list of token ids"):
            engine.generate(bad, 1, 2)


@pytest.mark.slow
def test_client_sends_the_key_from_the_environment(server, tokenizer, monkeypatch):
    """Without api_key the client sends SPARSELAYER_API_KEY; a wrong key is one line that says where to give it."""
    from sparselayer.rollout.remote import RemoteRolloutEngine

    monkeypatch.setenv(D.API_KEY_ENV, KEY)
    engine = RemoteRolloutEngine(server[0], tokenizer)
    assert engine.health()["served_model_name"] == [server[1].name]
    with pytest.raises(RemoteError, match=r"HTTP 401.*--rollout-api-key") as info:
        RemoteRolloutEngine(server[0], tokenizer, api_key="wrong").health()
    assert "\n" not in str(info.value)
    monkeypatch.delenv(D.API_KEY_ENV)
    with pytest.raises(RemoteError, match="HTTP 401"):
        RemoteRolloutEngine(server[0], tokenizer).update_weights(_layer(server[1]).items())
