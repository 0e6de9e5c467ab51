"""The GRPO objective, written once: advantages, the per-token loss of each loss type, token weights.

Everything here works on O(tokens) tensors of log-probabilities; how those log-probabilities are
computed (plain autograd through the LM head, or the fused kernels that never build a tokens x vocab
tensor) is the caller's business. The fused kernels take dL/dlogp from these functions by autograd.
"""
from .advantages import SCALE_REWARDS, group_advantages
from .loss import LOSS_TYPES, BatchTotals, TokenLoss, per_token_loss, tis_weights, token_weights

__all__ = ["LOSS_TYPES", "SCALE_REWARDS", "BatchTotals", "TokenLoss", "group_advantages", "per_token_loss",
           "tis_weights", "token_weights"]
