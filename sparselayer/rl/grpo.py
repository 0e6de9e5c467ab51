"""Compatibility alias of `sparselayer.objective` (advantages, the per-token loss, token and TIS weights)."""
from ..objective import TokenLoss, group_advantages, per_token_loss, tis_weights, token_weights

__all__ = ["TokenLoss", "group_advantages", "per_token_loss", "tis_weights", "token_weights"]
