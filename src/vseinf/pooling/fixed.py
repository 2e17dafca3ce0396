"""Fixed poolings: average, max, mean of the top K, and the first element.

Each is ``pooled, weights = pool(features, lengths)`` like GPO; ``weights`` (B × N) is the coefficient
of each sorted rank (avg, max, K-max: the special cases of GPO) or of each element (first element).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .functional import check_set_batch, valid_mask
from .kernels import rank_weighted_sum
from .registry import register_pooling

__all__ = ["AvgPool", "MaxPool", "KMaxPool", "ClsPool"]


@register_pooling("avg", aliases=("mean", "average"))
class AvgPool(nn.Module):
    """Mean over the valid elements (θ_k = 1/N)."""

    def forward(self, features: torch.Tensor, lengths=None):
        lengths = check_set_batch(features, lengths)
        mask = valid_mask(lengths, features.shape[1])
        weights = mask.to(features.dtype) / lengths.unsqueeze(1).to(features.dtype)
        pooled = features.masked_fill(~mask.unsqueeze(2), 0.0).sum(1) / lengths.unsqueeze(1).to(features.dtype)
        return pooled, weights


@register_pooling("max")
class MaxPool(nn.Module):
    """Per-dimension maximum over the valid elements (θ_1 = 1)."""

    def forward(self, features: torch.Tensor, lengths=None):
        lengths = check_set_batch(features, lengths)
        mask = valid_mask(lengths, features.shape[1])
        pooled = features.masked_fill(~mask.unsqueeze(2), float("-inf")).max(dim=1).values
        weights = torch.zeros_like(mask, dtype=features.dtype)
        weights[:, 0] = 1.0
        return pooled, weights


@register_pooling("kmax", argument="k")
class KMaxPool(nn.Module):
    """Mean of the K largest values of each dimension (all of them when the set has fewer than K).

    Args:
        k: how many of the top values to average.
    """

    def __init__(self, k: int):
        super().__init__()
        if int(k) < 1:
            raise ValueError(f"K-max pooling needs k >= 1, got {k}")
        self.k = int(k)

    def forward(self, features: torch.Tensor, lengths=None):
        lengths = check_set_batch(features, lengths)
        n_max = features.shape[1]
        kk = torch.clamp(lengths, max=self.k)
        weights = valid_mask(kk, n_max).to(features.dtype) / kk.unsqueeze(1).to(features.dtype)
        return rank_weighted_sum(features, lengths, weights, tail_eps=0.0), weights


@register_pooling("cls")
class ClsPool(nn.Module):
    """The first element of each set (the [CLS] token of a transformer's output).

    Not permutation invariant, by design: it is meaningful for text, whose first token is [CLS].
    """

    def forward(self, features: torch.Tensor, lengths=None):
        lengths = check_set_batch(features, lengths)
        weights = torch.zeros(features.shape[:2], dtype=features.dtype, device=features.device)
        weights[:, 0] = 1.0
        return features[:, 0], weights
