"""The GRPO objective, written once: advantages, the per-token loss of each loss type, token weights,
the sampler importance-sampling correction.

Everything here works on O(tokens) tensors of log-probabilities; how those log-probabilities are
computed (plain autograd through the LM head, or the fused kernels that never build a tokens x vocab
tensor) is the caller's business. The fused kernels take dL/dlogp from these functions by autograd.
"""
from .advantages import ADVANTAGES, SCALE_REWARDS, discounted_returns, gigpo_advantages, group_advantages
from .loss import (
    IS_LEVELS,
    IS_MODES,
    LOSS_TYPES,
    BatchTotals,
    ObjectiveOptions,
    TokenLoss,
    objective_loss,
    per_token_loss,
    resolve_options,
    sampling_correction,
    share_weights,
    step_shares,
    tis_weights,
    token_weights,
)

__all__ = ["ADVANTAGES", "IS_LEVELS", "IS_MODES", "LOSS_TYPES", "SCALE_REWARDS", "BatchTotals", "ObjectiveOptions",
           "TokenLoss", "discounted_returns", "gigpo_advantages", "group_advantages", "objective_loss",
           "per_token_loss", "resolve_options", "sampling_correction", "share_weights", "step_shares",
           "tis_weights", "token_weights"]
