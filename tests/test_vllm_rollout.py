"""The vLLM rollout engine for real (vLLM's CPU build, one engine per session): sampling, layer pushes, sync."""
from __future__ import annotations

import pytest
import torch
from helpers import DigitShareTask
from safetensors.torch import load_file

from sparselayer import TrainConfig, Trainer
from sparselayer.errors import SyncError
from sparselayer.sync.check import check_sync, trainer_logprobs

SEQUENCE = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]


@pytest.fixture
def engine(vllm_engine):
    """The session engine, reset to its model folder's weights."""
    vllm_engine.reload_all(load_file(vllm_engine.folder / "model.safetensors").items())
    return vllm_engine


@pytest.fixture
def hf_model(vllm_engine):
    from sparselayer.model.layout import load_model

    return load_model(vllm_engine.folder, "float32", "cpu")[0]


def layer_state(model: torch.nn.Module, k: int) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.startswith(f"model.layers.{k}.")}


def perturb(tensors: dict[str, torch.Tensor], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors.values():
            t.add_(0.05 * torch.randn(t.shape, generator=g))


def test_generate_seeded_rows_and_sampling_logprobs(engine, hf_model):
    tok = engine.tokenizer
    prompts = ["12+34=", "7+8="]
    a = engine.generate(prompts, 3, 6, seed=5)
    assert a.prompt_ids == [tok(p, add_special_tokens=False)["input_ids"] for p in prompts for _ in range(3)]
    assert a == engine.generate(prompts, 3, 6, seed=5)
    assert len({tuple(c) for c in a.completion_ids}) > 1
    for c, lp in zip(a.completion_ids, a.sampling_logprobs):
        assert 1 <= len(c) <= 6 and len(lp) == len(c)
        assert tok.eos_token_id not in c[:-1]
    # sampling log-probs at temperature 1 are the policy's log-probs of the sampled tokens
    ids = a.prompt_ids[0] + a.completion_ids[0]
    ours = trainer_logprobs(hf_model, ids)[len(a.prompt_ids[0]) - 1:]
    assert torch.allclose(ours, torch.tensor(a.sampling_logprobs[0]), atol=1e-3)
    hot = engine.generate(prompts, 2, 6, temperature=0.7, seed=1)  # log-probs after temperature, like the trainer's
    ids = torch.tensor([hot.prompt_ids[1] + hot.completion_ids[1]])
    with torch.no_grad():
        logp = (hf_model(input_ids=ids).logits[0, :-1] / 0.7).log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
    assert torch.allclose(logp[len(hot.prompt_ids[1]) - 1:], torch.tensor(hot.sampling_logprobs[1]), atol=1e-3)
    greedy = engine.generate(prompts, 2, 6, greedy=True)
    assert greedy.completion_ids[0] == greedy.completion_ids[1]


def test_push_sends_only_changed_tensors(engine, hf_model):
    layer = layer_state(hf_model, 2)
    perturb(layer, 0)
    first = engine.update_weights(layer.items())
    assert first == sum(t.numel() * 4 for t in layer.values()) and engine.last_push["tensors"] == len(layer)
    assert engine.update_weights(layer.items()) == 0
    with torch.no_grad():
        layer["model.layers.2.input_layernorm.weight"].add_(0.1)
    assert engine.update_weights(layer.items()) == layer["model.layers.2.input_layernorm.weight"].numel() * 4
    with torch.no_grad():
        layer["model.layers.2.self_attn.k_proj.weight"].mul_(1.5)  # fused: q, k and v travel together
    qkv = [f"model.layers.2.self_attn.{p}_proj.weight" for p in "qkv"]
    assert engine.update_weights(layer.items()) == sum(layer[n].numel() * 4 for n in qkv)
    assert check_sync(engine, hf_model, SEQUENCE, 1e-3) < 1e-3


def test_layer_push_gives_the_same_engine_as_a_full_reload(engine, hf_model):
    before = engine.prompt_logprobs(SEQUENCE)
    perturb(layer_state(hf_model, 1), 1)
    engine.update_weights(layer_state(hf_model, 1).items())
    pushed = (engine.prompt_logprobs(SEQUENCE), engine.generate(["3+4="], 4, 6, seed=2))
    assert pushed[0] != before
    engine.reload_all(load_file(engine.folder / "model.safetensors").items())
    assert engine.prompt_logprobs(SEQUENCE) == before
    engine.reload_all(hf_model.state_dict().items())
    assert (engine.prompt_logprobs(SEQUENCE), engine.generate(["3+4="], 4, 6, seed=2)) == pushed


def test_full_parameter_push_follows_the_tied_head(engine, hf_model):
    perturb(dict(hf_model.named_parameters()), 3)  # embeddings (tied to the head), final norm, every layer
    assert engine.update_weights(hf_model.named_parameters()) > 0
    assert check_sync(engine, hf_model, SEQUENCE, 1e-3) < 1e-3


def test_check_sync_names_the_difference(engine, hf_model):
    perturb(layer_state(hf_model, 3), 2)  # the trainer moved, the engine was not told
    with pytest.raises(SyncError, match="max \\|log-prob difference\\|"):
        check_sync(engine, hf_model, SEQUENCE, 1e-3)


@pytest.mark.slow
def test_two_training_steps_with_layer_pushes_stay_in_sync(engine, tmp_path):
    config = TrainConfig.from_mapping({
        "model": str(engine.folder), "layers": "2", "rollout": "vllm", "check_sync": True, "tis_cap": 2.0,
        "prompts_per_step": 4, "num_generations": 4, "learning_rate": 0.05, "max_steps": 2,
        "output_dir": str(tmp_path / "run"), "progress": False})
    trainer = Trainer(config, task=DigitShareTask(), engine=engine)
    before = engine.prompt_logprobs(SEQUENCE)
    layer_bytes = sum(p.numel() * 4 for p in trainer.trained.values())
    for _ in range(2):
        metrics = trainer.step()  # each step pushes layer 2 and checks sync (SyncError otherwise)
        assert metrics["push_bytes"] == layer_bytes and metrics["push_s"] > 0
    assert engine.prompt_logprobs(SEQUENCE) != before
    assert trainer.check_sync() < 1e-3
    assert engine.update_weights(trainer.trained_state().items()) == 0  # nothing changed since the last push
