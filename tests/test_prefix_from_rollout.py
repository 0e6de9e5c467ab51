"""--prefix-source rollout: the states the rollout engine captured while sampling are the trainer's own
frozen prefix (float32, relative 1e-5), and a step fed with them has the same loss and gradients."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from helpers import DigitShareTask
from transformers import AutoTokenizer

from sparselayer.batch import CapturedStates
from sparselayer.config import TrainConfig
from sparselayer.errors import ConfigError
from sparselayer.model import forward as forward_module
from sparselayer.model.layout import load_model
from sparselayer.model.prefix_cache import PrefixEntry
from sparselayer.rollout.base import RolloutEngine, Rollouts
from sparselayer.rollout.capture import CaptureSpec, CaptureSupport, resolve_prefix_source
from sparselayer.rollout.hf import HFRolloutEngine
from sparselayer.rollout.vllm_capture import Chunk, MissingStates, assemble, prefix_keys
from sparselayer.tasks.base import Example

FAMILIES = ["qwen3", "qwen2", "llama"]
LONG = 320  # context of the vLLM test engines


class VariedPromptTask(DigitShareTask):
    """Prompts of different lengths: a micro-batch of two groups has left-padded prompts."""

    @property
    def train(self):
        return [Example(p, "0") for p in ("1+2=", "12+34=", "123+45=", "7*8+90=", "5-3=", "40+2=")]


class EqualPromptTask(DigitShareTask):
    """Prompts of one length: no padding."""

    @property
    def train(self):
        return [Example(p, "0") for p in ("12+34=", "56+78=", "90-12=", "34*56=")]


def _trainer(model, task=None, engine=None, **extra):
    from sparselayer.trainer import Trainer

    cfg = TrainConfig.from_mapping({"model": str(model), "layers": "2", "prompts_per_step": 3, "num_generations": 4,
                                    "micro_batch_size": 8, "dtype": "float32", "max_completion_length": 8,
                                    "seed": 5, "beta": 0.0, "quant": "none", "rollout": "hf",
                                    "prefix_source": "rollout", "learning_rate": 0.05, **extra})
    return Trainer(cfg, task=task or VariedPromptTask(), engine=engine)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float(((a - b).norm() / b.norm().clamp(min=1e-30)).detach())


def _fed(entry: PrefixEntry) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt states of the real prompt tokens, completion states of the fed completion tokens) of an entry."""
    b = entry.batch
    P = b.prompt_len
    real_prompt = b.attention_mask[:, :P].bool()
    fed = b.completion_mask.clone()
    fed[torch.arange(len(fed)), fed.sum(dim=1) - 1] = 0  # the last sampled token is never fed
    if entry.shared is not None:
        s = entry.shared
        return s.hidden[s.index][real_prompt], entry.hidden[fed.bool()]
    return entry.hidden[:, :P][real_prompt], entry.hidden[:, P:][fed.bool()]


def _assert_states_are_the_prefix(trainer, sb, states: CapturedStates, tolerance: float = 1e-5) -> None:
    """Laid out per micro-batch, the captured states equal the trainer's own prefix at every fed position."""
    own = trainer.forward.prepare(sb.batch, sb.micro_batches)
    captured = trainer.forward.prepare(sb.batch, sb.micro_batches, states)
    assert len(own.items) == len(captured.items)
    for a, b in zip(own.items, captured.items):
        assert (a.shared is None) == (b.shared is None)
        for x, y in zip(_fed(b), _fed(a)):
            assert x.numel() > 0 and _rel(x, y) <= tolerance


def _grads_both_ways(trainer, sb, states: CapturedStates) -> list[tuple[dict, dict]]:
    """(stats, trained-layer gradients) of one pass over `sb`, with the own prefix and then the captured one."""
    out = []
    for use in (None, states):
        sb.inputs, sb.old_logp = trainer.forward.prepare(sb.batch, sb.micro_batches, use), None
        trainer.optimizer.zero_grad(set_to_none=True)
        stats = trainer.accumulate_gradients(sb)
        out.append((stats, {n: p.grad.clone() for n, p in trainer.trained.items()}))
    trainer.optimizer.zero_grad(set_to_none=True)
    return out


def _assert_same_step(trainer, sb, states: CapturedStates) -> None:
    (own_stats, own), (cap_stats, cap) = _grads_both_ways(trainer, sb, states)
    # on-policy the loss is a cancelling mean of terms of size |advantage| ~ 1: compare at float32 resolution
    assert cap_stats["loss"] == pytest.approx(own_stats["loss"], rel=1e-5, abs=1e-5)
    for name, grad in own.items():
        assert grad.norm() > 0 and _rel(cap[name], grad) <= 1e-5, name


# -- transformers' generate ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("share", ["on", "off"])
def test_hf_captured_states_are_the_trainer_prefix(tmp_path, family, share):
    model = make_tiny_model(tmp_path / family, model_type=family)
    trainer = _trainer(model, share_prompts=share)
    assert trainer.prefix_source == "rollout"
    sb = trainer.rollout_batch()
    states = sb.batch.states
    assert len(states.prompts) == 3 and len(states.completions) == 12  # prompts once per group
    assert [len(c) for c in states.completions] == [n - 1 for n in sb.batch.completion_mask.sum(dim=1).tolist()]
    _assert_states_are_the_prefix(trainer, sb, states)


def test_hf_captured_states_unpadded_prompts(tiny_model):
    trainer = _trainer(tiny_model, task=EqualPromptTask(), prompts_per_step=4)
    sb = trainer.rollout_batch()
    assert int(sb.batch.attention_mask[:, : sb.batch.prompt_len].min()) == 1  # no prompt padding
    _assert_states_are_the_prefix(trainer, sb, sb.batch.states)


def test_hf_step_with_captured_states_same_loss_and_gradient(tiny_model):
    trainer = _trainer(tiny_model)
    sb = trainer.rollout_batch()
    _assert_same_step(trainer, sb, sb.batch.states)


def test_rollout_source_skips_the_prefix_pass(tiny_model, monkeypatch):
    calls = []
    real = forward_module.compute_prefix
    monkeypatch.setattr(forward_module, "compute_prefix", lambda *a, **k: calls.append(1) or real(*a, **k))
    rollout = _trainer(tiny_model)
    metrics = rollout.step()
    assert calls == [] and rollout.last_batch.batch.states is None  # consumed, not kept past the step
    trainer = _trainer(tiny_model, prefix_source="trainer")
    assert trainer.step()["loss"] == pytest.approx(metrics["loss"], rel=1e-5)
    assert len(calls) == len(trainer.last_batch.micro_batches)


def test_states_under_a_budget_wait_in_cpu_memory(tiny_model):
    engine = HFRolloutEngine(load_model(tiny_model, "float32", "cpu")[0], AutoTokenizer.from_pretrained(tiny_model))
    engine.set_capture(CaptureSpec(1, torch.float64, torch.device("cpu"), budget_bytes=0))
    states = engine.generate([[5, 6, 7], [8, 9]], 2, 4, seed=1).states
    assert all(t.dtype == torch.float64 for t in [*states.prompts, *states.completions])
    assert states.nbytes() == sum(t.numel() * 8 for t in [*states.prompts, *states.completions])
    assert engine.generate([[5, 6, 7]], 2, 4, greedy=True).states is None  # evaluation captures nothing


# -- --prefix-source resolution -----------------------------------------------------------------------


class NoCaptureEngine(RolloutEngine):
    def generate(self, prompts, num_generations, max_new_tokens, temperature=1.0, top_p=1.0, seed=0, greedy=False):
        raise AssertionError("not called")

    def update_weights(self, named_tensors):
        return 0


def test_prefix_source_resolution(tiny_model):
    cpu = torch.device("cpu")
    assert resolve_prefix_source("auto", NoCaptureEngine(), 2, torch.float32, cpu) == "trainer"
    with pytest.raises(ConfigError, match="^--prefix-source rollout: the NoCaptureEngine rollout engine does not"):
        resolve_prefix_source("rollout", NoCaptureEngine(), 2, torch.float32, cpu)
    with pytest.raises(ConfigError, match="full forwards"):
        _trainer(tiny_model, layers="all")
    assert _trainer(tiny_model, layers="all", prefix_source="auto").prefix_source == "trainer"
    assert _trainer(tiny_model, prefix_source="auto").prefix_source == "trainer"  # hf: on request only
    assert _trainer(tiny_model, prefix_source="trainer").engine.capture is None


# -- vLLM's prefix cache: positions computed in another request --------------------------------------


def test_assembly_takes_positions_from_the_request_that_computed_them():
    """A group's prompt computed once in one child, a shared first block in another prompt's request."""
    H = 3
    spec = CaptureSpec(1, torch.float32, torch.device("cpu"))
    a, b = [1, 2, 3, 4], [1, 2, 9]  # prompts sharing their first two tokens
    seqs = {"0_0": a + [5, 6], "1_0": a + [7, 8], "0_1": b + [5, 5]}
    value = {}  # the state of a prefix: a function of its tokens only

    def state(tokens):
        return value.setdefault(tuple(tokens), torch.randn(H))

    def forward(parts):  # [(request, positions)] -> a chunk
        ids, starts, pos, rows = [], [0], [], []
        for rid, ps in parts:
            ids.append(f"{rid}-abcd1234")
            starts.append(starts[-1] + len(ps))
            pos += ps
            rows += [state(seqs[rid][: p + 1]) for p in ps]
        return Chunk(ids, starts, pos, torch.stack(rows))

    chunks = [forward([("0_0", [0, 1, 2, 3]), ("1_0", []), ("0_1", [2])]),  # 1_0 and 0_1 hit the cache
              forward([("0_0", [4]), ("1_0", [4]), ("0_1", [3])])]
    rows = [("0_0", 4, 2), ("1_0", 4, 2), ("0_1", 3, 2)]
    states = assemble(chunks, seqs, rows, [("0_0", 4), ("0_1", 3)], spec)
    assert torch.equal(states.prompts[1], torch.stack([state(b[:1]), state(b[:2]), state(b)]))
    assert torch.equal(states.completions[1], state(seqs["1_0"][:5])[None])
    with pytest.raises(MissingStates):
        assemble(chunks[1:], seqs, rows, [("0_0", 4), ("0_1", 3)], spec)
    assert prefix_keys([1, 2]) == prefix_keys([1, 2, 3])[:2] and prefix_keys([1])[0] != prefix_keys([2])[0]


# -- in-process vLLM --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def vllm_engines(tmp_path_factory):
    """One vLLM engine per family, built on first use: head size 32 (hidden 128), which vLLM's CPU attention
    takes unpadded, so the served model is the trainer's exactly; a context of 320 tokens, so that prompts
    can fill vLLM's 128-token cache blocks (prefix-cache hits). Kept to the end of the session: freeing an
    in-process vLLM engine tears down vLLM's process-wide parallel groups, which every other engine uses."""
    pytest.importorskip("vllm")
    import json

    from sparselayer.rollout.vllm_engine import VLLMRolloutEngine

    engines = {}

    def get(family: str):
        if family not in engines:
            folder = make_tiny_model(tmp_path_factory.mktemp(family) / "model", hidden=128, model_type=family)
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": LONG}))
            tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
            engines[family] = VLLMRolloutEngine(folder, tokenizer, torch.float32, "cpu", max_model_len=LONG)
        engine = engines[family]
        engine.set_capture(None)
        return engine

    yield get
    for engine in engines.values():
        engine.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_captured_states_are_the_trainer_prefix(vllm_engines, family):
    engine = vllm_engines(family)
    trainer = _trainer(engine.folder, engine=engine, share_prompts="on")  # 3 prompts x 4 samples, one call
    assert trainer.prefix_source == "rollout" and engine.capture is not None
    sb = trainer.rollout_batch()
    states = sb.batch.states
    assert len(states.prompts) == 3 and len(states.completions) == 12
    _assert_states_are_the_prefix(trainer, sb, states)
    unshared = _trainer(engine.folder, engine=engine, share_prompts="off", task=EqualPromptTask())
    sb = unshared.rollout_batch()
    _assert_states_are_the_prefix(unshared, sb, sb.batch.states)


def test_vllm_prefix_cache_hits_take_states_from_the_request_that_computed_them(vllm_engines):
    """Prompts over one 128-token cache block: each group's prompt block is computed in one child (the others
    hit vLLM's prefix cache), and two prompts share their first block; every row's states are still its own."""
    engine = vllm_engines("qwen3")
    engine.set_capture(CaptureSpec(2, torch.float32, torch.device("cpu")))
    g = torch.Generator().manual_seed(0)
    common = torch.randint(5, 40, (130,), generator=g).tolist()
    prompts = [common + [5, 6], common + [7], torch.randint(5, 40, (150,), generator=g).tolist()]
    out = engine.generate(prompts, 4, 6, seed=1)
    assert engine.last_capture["bytes"] < 12 * 150 * 128 * 4  # far fewer positions computed than rows hold
    model = load_model(engine.folder, "float32", "cpu")[0]
    for row, (p, c) in enumerate(zip(out.prompt_ids, out.completion_ids)):
        captured = torch.cat([out.states.prompts[row // 4], out.states.completions[row]])
        with torch.no_grad():
            own = model(input_ids=torch.tensor([(p + c)[: captured.shape[0]]]), output_hidden_states=True)
        assert _rel(captured, own.hidden_states[2][0]) <= 1e-5


@pytest.mark.slow
def test_vllm_steps_with_captured_states_across_pushes(vllm_engines):
    """Same loss and gradient as the own prefix, in two steps with a layer push between them: the push
    changes nothing below the trained layer, so the next rollout's states are still the trainer's."""
    engine = vllm_engines("qwen3")
    trainer = _trainer(engine.folder, engine=engine, prefix_source="auto", check_sync=True)
    assert trainer.prefix_source == "rollout"
    for _ in range(2):
        sb = trainer.rollout_batch()
        states = sb.batch.states
        _assert_states_are_the_prefix(trainer, sb, states)
        _assert_same_step(trainer, sb, states)
        trainer.attach_prefix(sb)
        trainer.optimize(sb)
        assert engine.update_weights(trainer.trained_state().items()) > 0
        assert trainer.check_sync() < 1e-3


def test_vllm_capture_support(vllm_engines):
    engine = vllm_engines("llama")
    assert engine.capture_support(torch.float32, "none") == CaptureSupport()
    assert engine.capture_support(torch.float32, "nf4").mismatch.startswith("the trainer's frozen layers")
    assert engine.capture_support(torch.bfloat16, "none").mismatch
    engine.enforce_eager = False
    try:
        assert "CUDA graphs" in engine.capture_support(torch.float32, "none").unavailable
    finally:
        engine.enforce_eager = True


def test_vllm_padded_heads_capture_what_vllm_serves(vllm_engine):
    """The session engine serves head size 16 padded to 32: its states are those of the padded model (1e-5),
    and differ from the unpadded trainer's only by q/k-norm's epsilon acting on twice the dims (1e-4)."""
    vllm_engine.set_capture(CaptureSpec(2, torch.float32, torch.device("cpu")))
    try:
        out: Rollouts = vllm_engine.generate([[5, 6, 7, 8, 9, 10], [7, 8, 30]], 3, 6, seed=2)
    finally:
        vllm_engine.set_capture(None)
    served = load_model(vllm_engine.serve_dir, "float32", "cpu")[0]
    trained = load_model(vllm_engine.folder, "float32", "cpu")[0]
    for row, (p, c) in enumerate(zip(out.prompt_ids, out.completion_ids)):
        captured = torch.cat([out.states.prompts[row // 3], out.states.completions[row]])
        ids = torch.tensor([(p + c)[: captured.shape[0]]])
        with torch.no_grad():
            assert _rel(captured, served(input_ids=ids, output_hidden_states=True).hidden_states[2][0]) <= 1e-5
            assert _rel(captured, trained(input_ids=ids, output_hidden_states=True).hidden_states[2][0]) <= 1e-4


# -- the step benchmark's variant ---------------------------------------------------------------------


def test_bench_step_prefix_from_the_rollout(tmp_path):
    from sparselayer.bench.config import StepBenchConfig
    from sparselayer.bench.step import bench_step, format_table

    tiny = dict(num_layers=4, hidden=64, intermediate=128, vocab=512, heads=4, kv_heads=2, layer=2, prompts=2,
                generations=4, prompt_len=8, completion_len=8, steps=1)
    result = bench_step(StepBenchConfig(**tiny, variants="sparse,sparse-rollout", capture_engine="hf"),
                        tmp_path / "step.json")
    sparse, rollout = result["results"]
    assert (sparse["prefix_source"], rollout["prefix_source"]) == ("trainer", "rollout")
    assert sparse["prefix_s"] > 0 and sparse["captured_bytes"] == 0
    assert rollout["captured_bytes"] == (2 * 8 + 8 * 7) * 64 * 4  # prompts once per group, no last token
    summary = result["prefix_from_rollout"]
    assert summary["saved_s"] == pytest.approx(sparse["step_time_s"] - rollout["step_time_s"])
    capture = summary["capture"]
    assert capture["engine"] == "hf" and capture["capture_bytes_during_generation"] > 0
    assert capture["generate_s"] > 0 and capture["generate_capture_s"] > 0
    assert "prefix from the rollout" in format_table(result) and "capture in hf sampling" in format_table(result)


def test_vllm_batches_over_4096_prompt_tokens(vllm_engines):
    """vLLM 0.32 on CPU fails a seeded request whose prefill it splits across forwards; the engine keeps
    whole prompts per forward, so a batch's prompts may pass vLLM's 4096 tokens per forward."""
    engine = vllm_engines("llama")
    engine.set_capture(CaptureSpec(1, torch.float32, torch.device("cpu")))
    prompts = torch.randint(5, 40, (8, 70), generator=torch.Generator().manual_seed(0)).tolist()
    out = engine.generate(prompts, 8, 2, seed=3)  # 64 rows x 70 prompt tokens
    assert len(out.completion_ids) == 64 and len(out.states.prompts) == 8
