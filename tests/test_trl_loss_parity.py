"""Parity with TRL 1.16's own GRPO loss: the same batch through `GRPOTrainer._compute_loss` and through
sparselayer's objective (fused head and plain materialized-logits head), loss and dL/dhidden within 1e-5
relative in float32, for every loss type both have and every loss option.

TRL runs unmodified: `_compute_loss` and `_get_per_token_logps_and_entropies` are called on a stand-in
object carrying the attributes they read; the model is a stand-in whose backbone returns fixed hidden
states, with TRL's own fused LM head (`add_fused_lm_head`) on top; the vLLM importance-sampling ratio is
computed by the very block of TRL's `_generate_and_score_completions` that computes it (taken from its
source and executed on these tensors).
"""
from __future__ import annotations

import ast
import inspect
import math
import textwrap
import types
import zlib
from collections import defaultdict
from contextlib import nullcontext

import pytest
import torch

trl = pytest.importorskip("trl")
from trl import GRPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from sparselayer.kernels import fused_grpo_loss, reference_grpo_loss, reference_logprobs  # noqa: E402
from sparselayer.objective import (  # noqa: E402
    BatchTotals,
    ObjectiveOptions,
    objective_loss,
    sampling_correction,
    share_weights,
    step_shares,
    token_weights,
)

B, P, C, H, V = 6, 3, 7, 16, 50
TOL = 1e-5
TEMPERATURE = 0.9


# ------------------------------------------------------------------------------------------- TRL's side


class _Backbone(torch.nn.Module):
    """Returns the batch's fixed final hidden states, whatever the input ids."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs) -> types.SimpleNamespace:
        return types.SimpleNamespace(last_hidden_state=self.hidden)


class _Config:
    def get_text_config(self) -> _Config:
        return self


class _HiddenLM(torch.nn.Module):
    """A causal LM whose logits are hidden @ W^T: its backbone yields `hidden` (B x (P + C) x H)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor):
        super().__init__()
        self.config = _Config()
        self.backbone = _Backbone(hidden)
        self.lm_head = torch.nn.Linear(H, V, bias=False)
        self.lm_head.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)

    @property
    def base_model(self) -> _Backbone:
        return self.backbone

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.lm_head

    def forward(self, *args, **kwargs):  # replaced by TRL's fused-head forward
        raise NotImplementedError


class _Accelerator:
    """One process: gather and reduce are the identity."""

    num_processes = 1
    sync_gradients = True
    is_main_process = True

    def autocast(self):
        return nullcontext()

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trl_stand_in(model: torch.nn.Module, opts: ObjectiveOptions, correction: bool, ga_steps: int = 1,
                  steps_per_generation: int = 1) -> types.SimpleNamespace:
    """The attributes `_compute_loss` reads, set as GRPOTrainer.__init__ would from a GRPOConfig."""
    args = types.SimpleNamespace(use_bias_correction_kl=opts.use_bias_correction_kl, delta=None,
                                 sapo_temperature_pos=opts.sapo_temperature_pos,
                                 sapo_temperature_neg=opts.sapo_temperature_neg,
                                 steps_per_generation=steps_per_generation)
    stand_in = types.SimpleNamespace(
        args=args, model=model, accelerator=_Accelerator(), loss_type=opts.loss_type, beta=opts.beta,
        epsilon_low=opts.epsilon, epsilon_high=opts.epsilon_high,
        importance_sampling_level=opts.importance_sampling_level,
        use_vllm=correction, vllm_importance_sampling_correction=correction, top_entropy_quantile=1.0,
        aux_loss_enabled=False, off_policy_mask_threshold=None, _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=ga_steps, max_completion_length=C,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    stand_in._get_per_token_logps_and_entropies = types.MethodType(GRPOTrainer._get_per_token_logps_and_entropies,
                                                                   stand_in)
    return stand_in


def _trl_is_block() -> types.CodeType:
    """The `if self.use_vllm and self.vllm_importance_sampling_correction:` block of TRL's
    `_generate_and_score_completions` that computes `vllm_importance_sampling_ratio`, compiled as is."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(GRPOTrainer._generate_and_score_completions)))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "vllm_importance_sampling_correction" in ast.unparse(node.test):
            body = ast.unparse(ast.Module(body=node.body, type_ignores=[]))
            if "per_token_logps_diff" in body and "vllm_importance_sampling_ratio" in body:
                return compile(ast.Module(body=[node], type_ignores=[]), "<trl importance sampling>", "exec")
    raise AssertionError("TRL's importance-sampling block was not found")


TRL_IS_BLOCK = _trl_is_block()


def trl_is_ratio(old: torch.Tensor, sampling: torch.Tensor, mask: torch.Tensor, mode: str,
                 clip_min: float | None, clip_max: float | None) -> torch.Tensor:
    """TRL's vLLM importance-sampling ratio ((B, T) or (B, 1)), by TRL's own lines."""
    stand_in = types.SimpleNamespace(use_vllm=True, vllm_importance_sampling_correction=True,
                                     vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=clip_min,
                                     vllm_importance_sampling_clip_max=clip_max)
    scope = {"self": stand_in, "completion_mask": mask, "tool_mask": None, "old_per_token_logps": old,
             "sampling_per_token_logps": sampling, "torch": torch, "math": math}
    exec(TRL_IS_BLOCK, scope)
    return scope["vllm_importance_sampling_ratio"]


def trl_loss(batch: dict, opts: ObjectiveOptions, correction: dict | None, rows: slice = slice(None), ga_steps: int = 1,
             steps_per_generation: int | None = None) -> tuple[float, torch.Tensor]:
    """(loss, dL/dhidden) from TRL's `_compute_loss` on `rows` of the batch, one of `ga_steps` accumulated
    micro-batches of a generation batch split into `steps_per_generation` steps (unset: ga_steps, TRL's default)."""
    steps_per_generation = ga_steps if steps_per_generation is None else steps_per_generation
    hidden = batch["hidden"][rows].clone().requires_grad_()
    model = _HiddenLM(hidden, batch["weight"])
    add_fused_lm_head(model, temperature=TEMPERATURE, outputs=("log_probs", "entropy"))
    model.train()
    mask = batch["completion_mask"][rows]
    inputs = {"prompt_ids": batch["prompt_ids"][rows], "prompt_mask": batch["prompt_mask"][rows],
              "completion_ids": batch["completion_ids"][rows], "completion_mask": mask,
              "advantages": batch["advantages"][rows], "old_per_token_logps": batch["old"][rows],
              "num_items_in_batch": batch["completion_mask"].sum()}
    if opts.beta > 0:
        inputs["ref_per_token_logps"] = batch["ref"][rows]
    if correction is not None:
        inputs["importance_sampling_ratio"] = trl_is_ratio(batch["old"][rows], batch["sampling"][rows], mask,
                                                           **correction)
    stand_in = _trl_stand_in(model, opts, correction is not None, ga_steps, steps_per_generation)
    loss = GRPOTrainer._compute_loss(stand_in, model, inputs)
    loss.backward()
    return loss.item(), hidden.grad


# -------------------------------------------------------------------------------------- sparselayer's side


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1)


def ours(batch: dict, opts: ObjectiveOptions, correction: dict | None, fused: bool,
         weights: torch.Tensor | None = None) -> tuple[float, torch.Tensor, float]:
    """(loss, dL/dhidden, loss scale) through a flat entry point: the hidden state before each completion token.

    The loss is a signed sum that can nearly cancel, so its error is measured against the scale
    sum_t |w_t * l_t| of its terms (the condition of the sum), not against the sum itself."""
    hidden = batch["hidden"].clone().requires_grad_()
    mask = batch["completion_mask"]
    if weights is None:
        weights = token_weights(mask, opts.loss_type, C, [list(range(B))])
    is_w = None if correction is None else sampling_correction(batch["old"], batch["sampling"], mask=mask,
                                                               **_modes(correction))
    flat_hidden = hidden[:, P - 1 : P + C - 1].reshape(-1, H)
    seq_index = torch.arange(B).repeat_interleave(C)
    args = (flat_hidden, batch["weight"], _flat(batch["completion_ids"]), _flat(batch["old"]),
            batch["advantages"].repeat_interleave(C), _flat(weights), opts.epsilon, opts.epsilon_high, opts.beta,
            _flat(batch["ref"]), None if is_w is None else _flat(is_w), TEMPERATURE)
    extra = {"loss_type": opts.loss_type, "options": opts, "mask": _flat(mask), "seq_index": seq_index}
    if fused:
        loss, logp = fused_grpo_loss(*args, **extra, chunk_tokens=16, chunk_vocab=24)
    else:
        loss, logp = reference_grpo_loss(*args, **extra)
    loss.backward()
    terms = objective_loss(logp.detach(), *args[3:5], opts, args[9], args[10], extra["mask"], seq_index).loss
    return loss.item(), hidden.grad, float((_flat(weights) * terms).abs().sum())


def _modes(correction: dict) -> dict:
    return {"mode": correction["mode"], "clip_min": correction["clip_min"], "clip_max": correction["clip_max"]}


def make_batch(seed: int, nan_sampler: bool = False) -> dict:
    """A padded batch: prompts (one left-padded), completions of several lengths (right-padded), off-policy
    old log-probs, reference and sampler log-probs near the policy's, zero at padding as TRL has them."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, P + C, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 2 / math.sqrt(H)
    prompt_ids = torch.randint(0, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, 0] = 0
    completion_ids = torch.randint(0, V, (B, C), generator=g)
    lengths = torch.tensor([C, 3, 5, 1, C - 1, 4])
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()
    with torch.no_grad():
        logits = hidden[:, P - 1 : P + C - 1] @ weight.T / TEMPERATURE
        logp = torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None]).squeeze(-1)
    real = completion_mask.bool()
    noisy = lambda scale: torch.where(real, logp + scale * torch.randn(B, C, generator=g), 0.0)  # noqa: E731
    old = noisy(0.3)
    sampling = torch.where(real, old + 0.2 * torch.randn(B, C, generator=g), 0.0)
    if nan_sampler:  # vLLM may give no log-prob for a token: TRL counts no difference there
        sampling[0, 2] = sampling[2, 4] = sampling[4, 0] = float("nan")
    advantages = torch.randn(B, generator=g)
    advantages[3] = 0.0
    return {"hidden": hidden, "weight": weight, "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids, "completion_mask": completion_mask, "advantages": advantages,
            "old": old, "ref": noisy(0.2), "sampling": sampling}


def assert_parity(got: tuple[float, torch.Tensor, float], want: tuple[float, torch.Tensor], what: str) -> None:
    """Loss within TOL of the scale of its terms, dL/dhidden within TOL relative (norm-wise); NaN never passes."""
    (loss, grad, scale), (ref_loss, ref_grad) = got, want
    assert math.isfinite(loss) and torch.isfinite(grad).all(), f"{what}: non-finite"
    assert ref_grad.norm() > 0 and scale > 0, f"{what}: the case carries no signal"
    assert abs(loss - ref_loss) <= TOL * scale, f"{what}: loss {loss} vs TRL {ref_loss} (scale {scale:.3g})"
    rel = float((grad - ref_grad).norm() / ref_grad.norm())
    assert rel <= TOL, f"{what}: dL/dhidden relative error {rel:.2e}"


# ------------------------------------------------------------------------------------------------ tests

LOSSES = [("grpo", None), ("grpo", 0.28), ("dapo", None), ("dapo", 0.28), ("dr_grpo", 0.28), ("bnpo", None),
          ("cispo", 1.2), ("cispo", None), ("sapo", None)]
KL = [(0.0, True), (0.04, True), (0.04, False)]  # (beta, use_bias_correction_kl)
CORRECTIONS = [None] + [{"mode": m, "clip_min": None, "clip_max": 3.0, "nan": True} for m in
                        ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")] + [
    {"mode": m, "clip_min": 0.7, "clip_max": 1.4, "nan": False} for m in
    ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")]


def _id(c: dict | None) -> str:
    return "no-is" if c is None else f"{c['mode']}-{c['clip_min']}-{c['clip_max']}{'-nan' if c['nan'] else ''}"


@pytest.mark.parametrize("correction", CORRECTIONS, ids=_id)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta,bias_kl", KL)
@pytest.mark.parametrize("loss_type,epsilon_high", LOSSES)
def test_loss_and_hidden_gradient_match_trl(loss_type, epsilon_high, beta, bias_kl, level, correction):
    batch = make_batch(zlib.crc32(f"{loss_type}{epsilon_high}{beta}{level}{_id(correction)}".encode()) % 1000,
                       nan_sampler=bool(correction and correction["nan"]))
    opts = ObjectiveOptions(loss_type, 0.2, epsilon_high, beta, bias_kl, level)
    modes = None if correction is None else _modes(correction)
    want = trl_loss(batch, opts, modes)
    for fused in (True, False):
        assert_parity(ours(batch, opts, modes, fused), want, f"{'fused' if fused else 'plain'}")


def test_cases_exercise_clips_masks_and_nan():
    """A batch like the parametrized ones reaches both sides of the clip, both IS bounds, masked and kept
    sequences, and NaN sampler log-probs (seed 11)."""
    batch = make_batch(11, nan_sampler=True)
    mask = batch["completion_mask"]
    seq = sampling_correction(batch["old"], batch["sampling"], "sequence_mask", 0.7, 1.4, mask)
    assert (seq[:, 0] == 0).any() and (seq[:, 0] > 0).any()
    tok = sampling_correction(batch["old"], batch["sampling"], "token_truncate", 0.7, 1.4, mask)
    assert (tok == 1.4).any() and (tok == 0.7).any() and torch.isfinite(tok).all()
    assert tok[0, 2] == 1.0  # the NaN sampler log-prob: no difference, ratio 1
    hidden = batch["hidden"][:, P - 1 : P + C - 1].reshape(-1, H)
    logp = reference_logprobs(hidden, batch["weight"], _flat(batch["completion_ids"]), TEMPERATURE).view(B, C)
    ratio = torch.exp(logp - batch["old"])[mask.bool()]
    assert (ratio > 1.28).any() and (ratio < 0.8).any()


def test_sapo_temperatures_match_trl():
    batch = make_batch(7)
    opts = ObjectiveOptions("sapo", 0.2, None, 0.04, True, "token", sapo_temperature_pos=0.6,
                            sapo_temperature_neg=2.5)
    assert_parity(ours(batch, opts, None, True), trl_loss(batch, opts, None), "sapo temperatures")


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo"])
def test_gradient_accumulation_matches_trl(loss_type):
    """Two micro-batches: TRL's two accumulated `_compute_loss` calls equal token_weights' batch loss."""
    batch = make_batch(11)
    opts = ObjectiveOptions(loss_type, 0.2, 1.2 if loss_type == "cispo" else 0.28, 0.04)
    halves = [slice(0, 3), slice(3, 6)]
    parts = [trl_loss(batch, opts, None, rows, ga_steps=2) for rows in halves]
    want = (sum(p[0] for p in parts), torch.cat([p[1] for p in parts]))
    weights = token_weights(batch["completion_mask"], loss_type, C, [[0, 1, 2], [3, 4, 5]])
    assert_parity(ours(batch, opts, None, True, weights), want, loss_type)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo"])
def test_steps_per_generation_share_weights_match_trl(loss_type):
    """steps_per_generation 2: each optimizer step's loss on its half is TRL's, normalised as TRL does
    (dapo, cispo: the generation batch's tokens / 2)."""
    batch = make_batch(13)
    opts = ObjectiveOptions(loss_type, 0.2, 1.2 if loss_type == "cispo" else 0.28, 0.0)
    micro = [[0, 1, 2], [3, 4, 5]]
    shares = step_shares(len(micro), 2)
    assert shares == [[0], [1]]
    weights = share_weights(batch["completion_mask"], loss_type, C, micro, shares)
    for share, rows in zip(shares, (slice(0, 3), slice(3, 6))):
        want = trl_loss(batch, opts, None, rows, steps_per_generation=2)
        share_only = torch.zeros_like(weights)
        share_only[micro[share[0]]] = weights[micro[share[0]]]
        loss, grad, scale = ours(batch, opts, None, True, share_only)
        assert_parity((loss, grad[rows], scale), want, f"{loss_type} share {share}")


def test_share_weights_with_totals_equal_the_single_process_ones():
    """Given per-share totals equal to its own counts, share_weights reproduces the single-process weights."""
    mask = make_batch(2)["completion_mask"]
    micro = [[0, 1], [2, 3], [4, 5]]
    shares = step_shares(3, 2)
    for loss_type in ("grpo", "dapo", "bnpo", "dr_grpo"):
        totals = [BatchTotals(sum(len(micro[j]) for j in s), int(sum(mask[micro[j]].sum() for j in s)), len(s))
                  for s in shares]
        torch.testing.assert_close(share_weights(mask, loss_type, C, micro, shares, totals),
                                   share_weights(mask, loss_type, C, micro, shares))


def test_rows_path_matches_flat_path_at_sequence_level():
    """The trainer's B x C form (rows are sequences) equals the flat form with seq_index."""
    batch = make_batch(5, nan_sampler=True)
    mask = batch["completion_mask"]
    opts = ObjectiveOptions("grpo", 0.2, 0.28, 0.04, True, "sequence")
    logp = batch["old"] + 0.1
    is_w = sampling_correction(batch["old"], batch["sampling"], "sequence_truncate", None, 3.0, mask)
    rows = objective_loss(logp, batch["old"], batch["advantages"], opts, batch["ref"], is_w, mask)
    flat = objective_loss(_flat(logp), _flat(batch["old"]), batch["advantages"].repeat_interleave(C), opts,
                          _flat(batch["ref"]), _flat(is_w), _flat(mask), torch.arange(B).repeat_interleave(C))
    torch.testing.assert_close(_flat(rows.loss) * _flat(mask), flat.loss * _flat(mask))
