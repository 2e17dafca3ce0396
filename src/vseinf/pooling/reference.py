"""The obviously-right GPO, the oracle its fast path is tested against."""

from __future__ import annotations

import torch
import torch.nn as nn

from .functional import check_set_batch
from .gpo import positional_encoding

__all__ = ["GPOReference"]


class GPOReference(nn.Module):
    """GPO computed the slow way: per sample, its own generator pass and a full sort. Same parameters
    as :class:`~vseinf.pooling.GPO`: load a GPO state dict into it with ``strict=True``.

    Args:
        d_pe: size of the rank encoding.
        d_hidden: hidden size of the bidirectional GRU.
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32):
        super().__init__()
        self.d_pe = d_pe
        self.gru = nn.GRU(d_pe, d_hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)

    def theta(self, n: int) -> torch.Tensor:
        pe = positional_encoding(n, self.d_pe, self.linear.weight.device).unsqueeze(0)
        out, _ = self.gru(pe)  # no padding: a plain run is the packed run
        out = (out[..., : out.shape[2] // 2] + out[..., out.shape[2] // 2:]) / 2
        return torch.softmax(self.linear(out).squeeze(0).squeeze(1) / 0.1, dim=0)

    def forward(self, features: torch.Tensor, lengths=None):
        lengths = check_set_batch(features, lengths)
        batch, n_max, _ = features.shape
        weights = features.new_zeros(batch, n_max)
        pooled = []
        for b in range(batch):
            n = int(lengths[b])
            theta = self.theta(n)
            weights[b, :n] = theta
            values = features[b, :n].sort(dim=0, descending=True).values
            pooled.append((theta.unsqueeze(1) * values).sum(0))
        return torch.stack(pooled), weights
