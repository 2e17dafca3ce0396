"""The Generalized Pooling Operator (GPO) of VSE∞ (Chen et al., CVPR 2021; recipe §2).

For each of the D dimensions of a set of N vectors, sort the N values in descending order and take
a weighted sum with coefficients θ_1..θ_N that depend only on the rank k and on N:

    pe_k   = sin/cos encoding of the rank k = 0..N-1 (d_pe = 32)
    h_k    = BiGRU(pe_0..pe_{N-1})_k, its two directions averaged (d_hidden = 32)
    θ      = softmax_k(linear(h_k) / 0.1)               over the N valid ranks, 0 past them
    out_d  = Σ_k θ_k · (k-th largest value of dimension d)

Padding never takes a rank. Because θ depends only on N, it is computed once per distinct set size
in the batch. The sort-and-sum and the BiGRU are fast paths in ``kernels``; ``GPOReference`` is the
slow twin the tests hold this to. Submodules ``gru`` and ``linear`` carry the authors' names, so
their state dicts load with ``strict=True``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .functional import check_set_batch, valid_mask
from .kernels import bigru_over_positions, on_one_thread, rank_weighted_sum
from .registry import register_pooling

__all__ = ["positional_encoding", "RankWeightedPool", "GPO"]


def positional_encoding(length: int, dim: int, device=None) -> torch.Tensor:
    """Transformer sin/cos encoding of positions 0..length-1 (length × dim), 0-based like the authors."""
    if dim % 2:
        raise ValueError(f"positional encoding size must be even, got d_pe={dim}")
    position = torch.arange(length, dtype=torch.float32, device=device).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(position * freq)
    pe[:, 1::2] = torch.cos(position * freq)
    return pe


class RankWeightedPool(nn.Module):
    """A weighted sum over each dimension's sorted values, θ a softmax of scores that depend only on
    (k, N). Subclasses say how to score: ``size_scores``.

    Args:
        tail_eps: θ mass that may be skipped when all but it sits on the top ranks (a max-like θ
            is summed without a full sort; see :func:`~vseinf.pooling.kernels.rank_weighted_sum`).
    """

    temperature: float = 0.1

    def __init__(self, tail_eps: float = 1e-6):
        super().__init__()
        self.tail_eps = tail_eps

    def size_scores(self, sizes: torch.Tensor, n_max: int) -> torch.Tensor:
        """Scores (U × n_max) for the distinct set sizes ``sizes`` (U); positions >= size are ignored."""
        raise NotImplementedError

    def coefficients(self, sizes: torch.Tensor, n_max: int | None = None) -> torch.Tensor:
        """θ for each size in ``sizes`` (U × n_max): softmax(score / T) over the valid positions, 0 after."""
        sizes = torch.as_tensor(sizes, dtype=torch.long)
        n_max = int(sizes.max()) if n_max is None else n_max

        def theta() -> torch.Tensor:
            # The generator is tiny and its softmax is sharp (T = 0.1): fp32 even under autocast.
            with torch.autocast(sizes.device.type, enabled=False):
                scores = self.size_scores(sizes, n_max).float()
            scores = scores.masked_fill(~valid_mask(sizes.to(scores.device), n_max), float("-inf"))
            return torch.softmax(scores / self.temperature, dim=1)

        return on_one_thread(theta, self.parameters())  # hundreds of kernels on a few numbers each

    def forward(self, features: torch.Tensor, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool a padded batch of sets (B × N × D, ``lengths`` B) → (B × D pooled, B × N θ per rank)."""
        lengths = check_set_batch(features, lengths)
        sizes, inverse = torch.unique(lengths, return_inverse=True)
        theta = self.coefficients(sizes, features.shape[1])  # U × N, one row per distinct size
        weights = theta[inverse].to(features.dtype)  # B × N
        return rank_weighted_sum(features, lengths, weights, self.tail_eps), weights


@register_pooling("gpo")
class GPO(RankWeightedPool):
    """GPO: sin/cos rank encoding → BiGRU → linear → softmax(· / T) → weighted sum of sorted values.

    Args:
        d_pe: size of the encoding of each rank (paper: 32).
        d_hidden: hidden size of the bidirectional GRU; directions are averaged (paper: 32).
        tail_eps: see :class:`RankWeightedPool`; 0 always sorts fully.
        temperature: softmax temperature of θ (paper: 0.1).
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32, tail_eps: float = 1e-6, temperature: float = 0.1):
        super().__init__(tail_eps)
        if not temperature > 0:
            raise ValueError(f"GPO temperature must be positive, got {temperature!r}")
        self.d_pe, self.d_hidden, self.temperature = d_pe, d_hidden, float(temperature)
        self.gru = nn.GRU(d_pe, d_hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)

    def size_scores(self, sizes: torch.Tensor, n_max: int) -> torch.Tensor:
        device = self.linear.weight.device
        pe = positional_encoding(n_max, self.d_pe, device).to(self.linear.weight.dtype)
        # The BiGRU reads ranks 0..N-1 for each size N (its reverse direction starts at N-1).
        hidden = bigru_over_positions(self.gru, pe, sizes.to(device))  # U × n_max × d_hidden
        return self.linear(hidden).squeeze(2)
