"""The per-token GRPO-family objective and the token weights that turn it into a batch loss.

A loss type is two choices: a surrogate (one function of the importance ratio, the token's log-prob and
the advantage) and a normalization (how tokens are weighted into the batch loss). The batch loss is
sum_t w_t * l_t over completion tokens, with weights w_t fixed by the normalization, so
micro-batches just sum their share and gradient accumulation reproduces the full-batch loss
exactly, whatever the packing. Adding a loss type is one surrogate function and one table row.

The semantics follow TRL's GRPOTrainer (1.16, `_compute_loss`): the ratio at token or sequence level
(GSPO), the k3 KL optionally multiplied by the ratio (`use_bias_correction_kl`), and the sampler
correction (`sampling_correction`) multiplying the surrogate before the KL is added.

Shapes: every per-token tensor is B x T (a row is a sequence) or flat (N,). Where a formula needs the
sequence a token belongs to (sequence-level ratios and corrections), flat inputs give `seq_index` (N,),
the row of each token; without it a flat input is one sequence. `mask` marks the tokens that count in a
sequence's sums (default: all of them).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

IS_LEVELS = ("token", "sequence")  # TRL importance_sampling_level
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")  # vllm_importance_sampling_mode


@dataclass(frozen=True)
class ObjectiveOptions:
    """The settings of the objective, named as in TRL's GRPOConfig (epsilon_high unset: epsilon)."""

    loss_type: str = "grpo"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    use_bias_correction_kl: bool = True
    importance_sampling_level: str = "token"
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05

    def __post_init__(self) -> None:
        _loss_type(self.loss_type)
        if self.importance_sampling_level not in IS_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, "
                             f"got {self.importance_sampling_level!r}")
        if self.epsilon_high is None:
            object.__setattr__(self, "epsilon_high", self.epsilon)


# surrogate(ratio, logp, advantages, options) -> (per-token loss, clipped mask)
Surrogate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, ObjectiveOptions], tuple[torch.Tensor, torch.Tensor]]


def clipped_surrogate(ratio: torch.Tensor, logp: torch.Tensor, adv: torch.Tensor,
                      options: ObjectiveOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate -min(rA, clip(r, 1-eps, 1+eps_high)A); clipped where the clip binds."""
    low, high = 1 - options.epsilon, 1 + options.epsilon_high
    loss = -torch.min(ratio * adv, torch.clamp(ratio, low, high) * adv)
    clipped = ((ratio < low) & (adv < 0)) | ((ratio > high) & (adv > 0))
    return loss, clipped


def cispo_surrogate(ratio: torch.Tensor, logp: torch.Tensor, adv: torch.Tensor,
                    options: ObjectiveOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO (MiniMax-M1; TRL's definition): -sg(min(r, eps_high)) * A * logp. The importance weight is
    clipped and detached, so every token keeps its policy gradient; eps_high caps the weight itself."""
    cap = options.epsilon_high
    weight = torch.clamp(ratio, max=cap).detach()
    return -weight * adv * logp, (ratio > cap) & (adv > 0)


def sapo_surrogate(ratio: torch.Tensor, logp: torch.Tensor, adv: torch.Tensor,
                   options: ObjectiveOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """SAPO (TRL's definition): a soft gate instead of a clip, -sigmoid(tau (r - 1)) * 4 / tau * A, with
    tau = sapo_temperature_pos where A > 0, else sapo_temperature_neg. Nothing is clipped."""
    tau = torch.where(adv > 0, options.sapo_temperature_pos, options.sapo_temperature_neg).to(ratio.dtype)
    loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    return loss, torch.zeros_like(loss, dtype=torch.bool)


@dataclass(frozen=True)
class LossType:
    """A loss type: its surrogate and its normalization (see `token_weights`)."""

    surrogate: Surrogate
    normalization: str  # sequence | batch_tokens | max_length | micro_batch_tokens


LOSS_TYPE_TABLE = {
    "grpo": LossType(clipped_surrogate, "sequence"),
    "dapo": LossType(clipped_surrogate, "batch_tokens"),
    "dr_grpo": LossType(clipped_surrogate, "max_length"),
    "bnpo": LossType(clipped_surrogate, "micro_batch_tokens"),
    "cispo": LossType(cispo_surrogate, "batch_tokens"),
    "sapo": LossType(sapo_surrogate, "sequence"),
}
LOSS_TYPES = tuple(LOSS_TYPE_TABLE)


def _loss_type(name: str) -> LossType:
    if name not in LOSS_TYPE_TABLE:
        raise ValueError(f"unknown loss type {name!r} (one of {', '.join(LOSS_TYPES)})")
    return LOSS_TYPE_TABLE[name]


@dataclass(frozen=True)
class BatchTotals:
    """Counts of the WHOLE rollout batch when it is split across ranks (data-parallel training): the
    batch-level normalisers divide by these, so each rank's loss is its exact share of the global one."""

    sequences: int
    tokens: float  # a count, or (steps_per_generation > 1, dapo/cispo) the batch's tokens / steps
    micro_batches: int


def token_weights(mask: torch.Tensor, loss_type: str, max_completion_length: int,
                  micro_batches: list[list[int]], totals: BatchTotals | None = None) -> torch.Tensor:
    """Per-token weights w (B x T) such that the batch loss is (w * per_token_loss).sum().

    sequence (grpo, sapo): mean over each sequence's tokens, then over sequences; batch_tokens (dapo,
    cispo): mean over all tokens of the rollout batch; max_length (dr_grpo): sum over tokens / (sequences
    x max_completion_length); micro_batch_tokens (bnpo): token mean within each micro-batch, averaged
    over micro-batches. `totals`: the global batch's counts when `mask` is one rank's share (unset: this
    batch is the whole batch).
    """
    normalization = _loss_type(loss_type).normalization
    mask = mask if mask.is_floating_point() else mask.float()
    n = mask.shape[0] if totals is None else totals.sequences
    if normalization == "sequence":
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1) / n
    if normalization == "batch_tokens":
        tokens = mask.sum() if totals is None else torch.tensor(totals.tokens, dtype=mask.dtype, device=mask.device)
        return mask / tokens.clamp(min=1)
    if normalization == "max_length":
        return mask / (n * max_completion_length)
    count = len(micro_batches) if totals is None else totals.micro_batches
    weights = torch.zeros_like(mask)
    for rows in micro_batches:
        weights[rows] = mask[rows] / mask[rows].sum().clamp(min=1) / count
    return weights


def step_shares(micro_batches: int, steps: int) -> list[list[int]]:
    """The micro-batch indices of each of `steps` optimizer steps on one rollout batch (TRL's
    steps_per_generation): consecutive groups whose sizes differ by at most one."""
    if not 1 <= steps <= micro_batches:
        raise ValueError(f"{steps} optimizer steps need at least as many micro-batches, got {micro_batches}")
    bounds = [round(i * micro_batches / steps) for i in range(steps + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(steps)]


def share_weights(mask: torch.Tensor, loss_type: str, max_completion_length: int, micro_batches: list[list[int]],
                  shares: list[list[int]], totals: list[BatchTotals] | None = None) -> torch.Tensor:
    """Token weights (B x T) when the rollout batch is optimized in len(shares) steps, one per share (micro-batch
    indices, `step_shares`): each step's loss is sum(w * l) over its own rows, normalised as TRL does over its
    share: its own sequences (grpo, sapo, dr_grpo) and micro-batches (bnpo), and 1/steps of the batch's
    tokens (dapo, cispo: TRL's num_items_in_batch / steps_per_generation). One share: `token_weights`.
    `totals`: per share, the global counts when `mask` is one rank's share of the batch.
    """
    if len(shares) == 1:
        return token_weights(mask, loss_type, max_completion_length, micro_batches, totals[0] if totals else None)
    mask = mask if mask.is_floating_point() else mask.float()
    batch_tokens = float(mask.sum()) if totals is None else float(sum(t.tokens for t in totals))
    weights = torch.zeros_like(mask)
    for s, share in enumerate(shares):
        rows = [r for j in share for r in micro_batches[j]]
        position = {r: i for i, r in enumerate(rows)}
        local = [[position[r] for r in micro_batches[j]] for j in share]
        own = BatchTotals(len(rows), int(mask[rows].sum()), len(share)) if totals is None else totals[s]
        if _loss_type(loss_type).normalization == "batch_tokens":
            own = replace(own, tokens=batch_tokens / len(shares))
        weights[rows] = token_weights(mask[rows], loss_type, max_completion_length, local, own)
    return weights


def sequence_sums(x: torch.Tensor, mask: torch.Tensor | None = None,
                  seq_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of x over its sequence's masked tokens, that sequence's masked token count), both broadcast
    back to x's shape: what a sequence-level ratio or correction gives each of the sequence's tokens."""
    m = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    if seq_index is None and x.dim() == 2:
        sums, counts = (x * m).sum(-1, keepdim=True), m.sum(-1, keepdim=True)
        return sums.expand_as(x), counts.expand_as(x)
    index = torch.zeros_like(x, dtype=torch.long) if seq_index is None else seq_index.to(x.device).long()
    size = int(index.max()) + 1 if index.numel() else 0
    sums = x.new_zeros(size).index_add(0, index.reshape(-1), (x * m).reshape(-1))
    counts = x.new_zeros(size).index_add(0, index.reshape(-1), m.reshape(-1))
    return sums[index], counts[index]


def log_importance_weights(logp: torch.Tensor, old_logp: torch.Tensor, level: str = "token",
                           mask: torch.Tensor | None = None, seq_index: torch.Tensor | None = None) -> torch.Tensor:
    """log r per token: logp - old_logp (token level), or the sequence's masked mean of it (sequence
    level, GSPO: one ratio per sequence, broadcast to its tokens). Differentiable in logp."""
    log_ratio = logp - old_logp
    if level == "token":
        return log_ratio
    sums, counts = sequence_sums(log_ratio, mask, seq_index)
    return sums / counts.clamp(min=1.0)


@dataclass
class TokenLoss:
    """Per-token loss plus the diagnostics GRPO reports."""

    loss: torch.Tensor  # to be weighted by token_weights
    kl: torch.Tensor  # k3 estimate, times the ratio with use_bias_correction_kl (zeros when beta == 0)
    clipped: torch.Tensor  # bool, where the surrogate's clip is active


def objective_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, options: ObjectiveOptions,
                   ref_logp: torch.Tensor | None = None, is_weights: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, seq_index: torch.Tensor | None = None) -> TokenLoss:
    """The loss type's surrogate [x sampler IS weight] plus beta * k3 KL [x ratio], per token.

    Differentiable in `logp` (B x T, or flat N); `old_logp`, `ref_logp`, `is_weights` (from
    `sampling_correction`), `mask` and `seq_index` have its shape; `advantages` is per sequence (B,) for
    B x T log-probs, or per token. Computed in logp's dtype.
    """
    dtype = logp.dtype
    adv = advantages.to(dtype)
    if adv.dim() == logp.dim() - 1:
        adv = adv.unsqueeze(-1)
    ratio = torch.exp(log_importance_weights(logp, old_logp.to(dtype), options.importance_sampling_level, mask,
                                             seq_index))
    loss, clipped = _loss_type(options.loss_type).surrogate(ratio, logp, adv, options)
    if is_weights is not None:
        loss = loss * is_weights.to(dtype)
    kl = torch.zeros_like(logp)
    if options.beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs reference log-probs")
        delta = ref_logp.to(dtype) - logp
        kl = torch.exp(delta) - delta - 1
        if options.use_bias_correction_kl:  # the unbiased reverse-KL gradient (DeepSeek-V3.2; TRL's default)
            kl = kl * ratio
        loss = loss + options.beta * kl
    return TokenLoss(loss=loss, kl=kl, clipped=clipped)


def per_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                   epsilon: float, epsilon_high: float | None, beta: float = 0.0,
                   ref_logp: torch.Tensor | None = None, tis: torch.Tensor | None = None,
                   loss_type: str = "grpo", *, options: ObjectiveOptions | None = None,
                   mask: torch.Tensor | None = None, seq_index: torch.Tensor | None = None) -> TokenLoss:
    """`objective_loss` with the settings spelled out. Without `options` this is the plain form: token
    level, k3 KL without the ratio correction; with `options`, its remaining settings apply (its loss_type,
    epsilon, epsilon_high and beta must agree with the arguments: see `resolve_options`)."""
    options = resolve_options(options, loss_type, epsilon, epsilon_high, beta)
    return objective_loss(logp, old_logp, advantages, options, ref_logp, tis, mask, seq_index)


def resolve_options(options: ObjectiveOptions | None, loss_type: str, epsilon: float, epsilon_high: float | None,
                    beta: float) -> ObjectiveOptions:
    """The options of a call that names loss_type/epsilon/epsilon_high/beta itself: those four, plus
    `options`' other settings (None: the plain form, no KL correction); a disagreement is a ValueError."""
    named = ObjectiveOptions(loss_type, epsilon, epsilon_high, beta, use_bias_correction_kl=False)
    if options is None:
        return named
    merged = replace(options, loss_type=loss_type, epsilon=epsilon, epsilon_high=named.epsilon_high, beta=beta)
    if merged != options:
        raise ValueError(f"options {options} disagree with loss_type={loss_type!r}, epsilon={epsilon}, "
                         f"epsilon_high={epsilon_high}, beta={beta}")
    return options


def sampling_correction(old_logp: torch.Tensor, sampling_logp: torch.Tensor, mode: str = "sequence_mask",
                        clip_min: float | None = None, clip_max: float | None = 3.0,
                        mask: torch.Tensor | None = None, seq_index: torch.Tensor | None = None) -> torch.Tensor:
    """Importance-sampling weights for the sampler/trainer mismatch (TRL's vLLM correction), detached.

    The sampler (vLLM) and the trainer compute slightly different probabilities for the same policy; the
    weight is exp(old_logp - sampling_logp) per token (token_*) or exp of its sum over the sequence
    (sequence_*, one weight per sequence), then truncated to [clip_min, clip_max] (*_truncate) or set to
    0 outside it (*_mask; an unset bound is no bound). Tokens outside `mask` and tokens whose sampler
    log-prob is NaN contribute a zero difference (weight 1 at token level).
    """
    if mode not in IS_MODES:
        raise ValueError(f"importance sampling mode must be one of {IS_MODES}, got {mode!r}")
    diff = old_logp.detach().float() - sampling_logp.detach().float()
    if mask is not None:
        diff = diff * mask.float()
    diff = torch.nan_to_num(diff, nan=0.0)
    if mode.startswith("sequence"):
        diff = sequence_sums(diff, None, seq_index)[0]
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return ratio if clip_min is None and clip_max is None else torch.clamp(ratio, min=clip_min, max=clip_max)
    low = -torch.inf if clip_min is None else clip_min
    high = torch.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def tis_weights(old_logp: torch.Tensor, sampling_logp: torch.Tensor, cap: float,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Truncated importance-sampling weights min(exp(old_logp - sampling_logp), cap) per token, detached:
    `sampling_correction` in mode token_truncate (padding positions, mask 0, get weight 1)."""
    return sampling_correction(old_logp, sampling_logp, "token_truncate", None, cap, mask)
