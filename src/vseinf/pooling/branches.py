"""Several poolings side by side over slices of the features: an ensemble inside one head.

``build_pooling("gpo+max", 2048)`` pools channels 0..1023 with GPO and 1024..2047 with max pooling,
l2-normalises each half and concatenates them, scaled by 1/√K so the result is a unit vector. The
dot product of two such vectors is the mean of the branches' cosine similarities: exactly what an
ensemble of K separately trained models scores (``vseinf eval`` with several ``--checkpoint``),
but from one model, one checkpoint and one index. Trained with one loss per branch
(``VSELoss(branches=K)``), the branches learn as K independent models on the same batches would.

Why: on frozen Flickr8k features a GPO model and a max-pooling model make different mistakes
(two GPO models averaged gain ~3 RSUM, GPO and max averaged gain ~22; README, "The recipe's
ablation").
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .functional import check_set_batch, l2norm

__all__ = ["BranchPool", "split_branches"]


class BranchPool(nn.Module):
    """Pool consecutive channel slices with different poolings; each slice comes out unit-norm / √K.

    Args:
        branches: the K pooling layers, in channel order (each sees ``dim / K`` channels).
        names: their registered names (for ``repr`` and plots).
    """

    def __init__(self, branches: list[nn.Module], names: list[str]):
        super().__init__()
        if len(branches) < 2 or len(branches) != len(names):
            raise ValueError(f"BranchPool needs two or more poolings with a name each, got {names}")
        self.branches = nn.ModuleList(branches)
        self.names = list(names)

    def forward(self, features: torch.Tensor, lengths=None):
        """B × N × D sets → (B × D: the K unit-norm slices / √K, the first branch's weights)."""
        lengths = check_set_batch(features, lengths)
        k = len(self.branches)
        if features.shape[-1] % k:
            raise ValueError(f"{'+'.join(self.names)} pooling splits the features into {k} equal slices, "
                             f"but they have {features.shape[-1]} channels")
        pooled, weights = [], None
        for pool, chunk in zip(self.branches, features.chunk(k, dim=-1)):
            out, w = pool(chunk, lengths)
            pooled.append(l2norm(out, dim=-1))
            weights = w if weights is None else weights
        return torch.cat(pooled, dim=-1) / math.sqrt(k), weights

    def extra_repr(self) -> str:
        return "+".join(self.names)


def split_branches(embeddings: torch.Tensor, branches: int) -> tuple[torch.Tensor, ...]:
    """The K unit vectors inside embeddings made by a K-branch pooling (each slice × √K)."""
    if branches == 1:
        return (embeddings,)
    return tuple(chunk * math.sqrt(branches) for chunk in embeddings.chunk(branches, dim=-1))
