"""The pooling study's other learned aggregators (recipe §8 and the paper's Table 2).

* GeM: a generalised mean with a learned exponent.
* FSPool: featurewise sort pooling, one learned curve over the ranks per dimension.
* One self-attention layer, averaged over the set.
* Three alternative generators of rank coefficients, from the synthetic study: an interpolated
  score vector ("interp"), sin/cos + MLP ("sincos_mlp"), index embedding + BiGRU ("index_bigru").
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .functional import check_set_batch, sorted_values, valid_mask
from .gpo import RankWeightedPool, positional_encoding
from .kernels import packed_bigru
from .registry import register_pooling

__all__ = ["GeMPool", "FSPool", "SelfAttentionPool", "InterpolatedIndexPool", "SinCosMLPPool", "IndexBiGRUPool"]


@register_pooling("gem")
class GeMPool(nn.Module):
    """Generalized-mean pooling with a learnable exponent p: (mean_n x_n^p)^(1/p) per dimension.

    Computed in log space, (logsumexp(p·log x) − log N) / p, so large p or small x neither overflow
    nor underflow (the usual ``x.pow(p).mean().pow(1/p)`` blows up). GeM is defined on positive values:
    inputs are clamped to ``eps``.

    Args:
        p: initial exponent (3 is the usual start).
        eps: lower clamp of the inputs.
        p_min: p is kept >= p_min.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, p_min: float = 1.0):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps
        self.p_min = p_min

    def forward(self, features: torch.Tensor, lengths=None):
        lengths = check_set_batch(features, lengths)
        mask = valid_mask(lengths, features.shape[1])
        p = self.p.clamp_min(self.p_min)
        # Padding becomes 1 before the log: NaN/inf there would otherwise poison p's gradient.
        logx = features.float().masked_fill(~mask.unsqueeze(2), 1.0).clamp_min(self.eps).log()
        scaled = (p * logx).masked_fill(~mask.unsqueeze(2), float("-inf"))
        log_mean = torch.logsumexp(scaled, dim=1) - lengths.float().log().unsqueeze(1)
        pooled = torch.exp(log_mean / p).to(features.dtype)
        weights = mask.to(features.dtype) / lengths.unsqueeze(1).to(features.dtype)
        return pooled, weights


@register_pooling("fspool", needs_dim=True)
class FSPool(nn.Module):
    """Featurewise sort pooling (Zhang et al., 2019), the paper's FSPool baseline.

    Each dimension d has its own learnable piecewise-linear curve over [0, 1] (``n_pieces`` + 1 knots);
    a set of size N reads it at k / (N − 1) for its sorted positions k = 0..N−1, and the pooled value
    is Σ_k curve_d(k) · (k-th largest value of dimension d) / N. Unlike GPO's θ the coefficients are
    not normalised (as in FSPool) and may be negative; the 1/N only fixes the scale (it cancels in the
    l2-normalised embedding). The knots start at 1, i.e. average pooling.

    Args:
        dim: feature dimension D (one curve per dimension).
        n_pieces: number of linear pieces of each curve.
    """

    def __init__(self, dim: int, n_pieces: int = 20):
        super().__init__()
        if dim is None or int(dim) < 1 or int(n_pieces) < 1:
            raise ValueError(f"FSPool needs dim >= 1 and n_pieces >= 1, got dim={dim!r}, n_pieces={n_pieces!r}")
        self.dim = int(dim)
        self.n_pieces = int(n_pieces)
        self.weight = nn.Parameter(torch.ones(self.dim, self.n_pieces + 1))

    def curves(self, sizes: torch.Tensor, n_max: int) -> torch.Tensor:
        """Coefficients (U × n_max × D) for the set sizes ``sizes``, divided by N, zero past each size."""
        device = self.weight.device
        sizes = torch.as_tensor(sizes, dtype=torch.long, device=device)
        k = torch.arange(n_max, device=device, dtype=torch.float32).unsqueeze(0)
        n = sizes.float().unsqueeze(1)
        ratio = (k / (n - 1).clamp_min(1)).clamp(0, 1) * self.n_pieces  # U × n_max in [0, n_pieces]
        left = ratio.floor().long().clamp(max=self.n_pieces - 1)
        frac = (ratio - left).unsqueeze(2)
        w = self.weight.t()  # (n_pieces + 1) × D
        curve = w[left] * (1 - frac) + w[left + 1] * frac  # U × n_max × D
        return curve * (valid_mask(sizes, n_max).unsqueeze(2) / n.unsqueeze(2))

    def forward(self, features: torch.Tensor, lengths=None):
        lengths = check_set_batch(features, lengths)
        if features.shape[2] != self.dim:
            raise ValueError(f"FSPool was built for dimension {self.dim}, got features of dimension "
                             f"{features.shape[2]}")
        sizes, inverse = torch.unique(lengths, return_inverse=True)
        coef = self.curves(sizes, features.shape[1])[inverse]  # B × N × D
        values = sorted_values(features, lengths)
        pooled = (values * coef.to(values.dtype)).sum(1)
        return pooled, coef.mean(2).to(features.dtype)


@register_pooling("attention", needs_dim=True)
class SelfAttentionPool(nn.Module):
    """One layer of multi-head self-attention over the set, with a residual, averaged over the set.

    Queries and keys are learned projections to ``n_heads`` × ``d_key``; the values are the inputs
    themselves, split into ``n_heads`` slices (no value/output projection, which keeps the layer cheap
    at D = 1024 on a CPU). No positional encoding, so the result is permutation invariant. With
    y_n = x_n + Σ_m a_nm x_m (per head) and the pooled vector (1/2N) Σ_n y_n, each element's weight in
    head h is (1/N + mean_n a^h_nm) / 2, a distribution over the set; ``weights`` averages it over heads.

    Args:
        dim: feature dimension D (divisible by ``n_heads``).
        n_heads: attention heads.
        d_key: query/key size per head.
    """

    def __init__(self, dim: int, n_heads: int = 8, d_key: int = 32):
        super().__init__()
        if dim is None or int(dim) < 1:
            raise ValueError(f"SelfAttentionPool needs the feature dimension, got dim={dim!r}")
        dim = int(dim)
        if dim % n_heads:
            n_heads = math.gcd(dim, n_heads)  # small test dimensions: fewer heads
        self.dim, self.n_heads, self.d_key = dim, n_heads, d_key
        self.query = nn.Linear(dim, n_heads * d_key)
        self.key = nn.Linear(dim, n_heads * d_key)

    def forward(self, features: torch.Tensor, lengths=None):
        lengths = check_set_batch(features, lengths)
        batch, n_max, dim = features.shape
        if dim != self.dim:
            raise ValueError(f"SelfAttentionPool was built for dimension {self.dim}, got {dim}")
        mask = valid_mask(lengths, n_max)
        x = features.masked_fill(~mask.unsqueeze(2), 0.0)
        heads = self.n_heads
        q = self.query(x).view(batch, n_max, heads, self.d_key).transpose(1, 2)  # B × H × N × dk
        k = self.key(x).view(batch, n_max, heads, self.d_key).transpose(1, 2)
        scores = (q @ k.transpose(2, 3)).float() / math.sqrt(self.d_key)  # B × H × N(query) × N(key)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        attn = torch.softmax(scores, dim=3)
        n = lengths.to(attn.dtype)
        received = (attn * mask[:, None, :, None]).sum(2) / n[:, None, None]  # B × H × N
        coef = (received + mask[:, None, :] / n[:, None, None]) / 2  # B × H × N, sums to 1 per head
        xs = x.view(batch, n_max, heads, dim // heads)
        pooled = torch.einsum("bhn,bnhc->bhc", coef.to(xs.dtype), xs).reshape(batch, dim)
        return pooled, coef.mean(1).to(features.dtype)


@register_pooling("interp")
class InterpolatedIndexPool(RankWeightedPool):
    """Synthetic-study generator "index + interpolated vector" (FSPool-style).

    A learnable score vector over ``n_pieces`` + 1 evenly spaced knots on [0, 1]; a set of size N reads
    it at positions k / (N - 1) by linear interpolation.

    Args:
        n_pieces: number of linear pieces of the score curve.
    """

    def __init__(self, n_pieces: int = 20, tail_eps: float = 1e-6):
        super().__init__(tail_eps)
        self.n_pieces = n_pieces
        self.knots = nn.Parameter(torch.zeros(n_pieces + 1))

    def size_scores(self, sizes: torch.Tensor, n_max: int) -> torch.Tensor:
        device = self.knots.device
        sizes = sizes.to(device).float().unsqueeze(1)
        k = torch.arange(n_max, device=device, dtype=torch.float32).unsqueeze(0)
        ratio = (k / (sizes - 1).clamp_min(1)).clamp(0, 1) * self.n_pieces  # U × n_max in [0, n_pieces]
        left = ratio.floor().long().clamp(max=self.n_pieces - 1)
        frac = ratio - left
        return self.knots[left] * (1 - frac) + self.knots[left + 1] * frac


@register_pooling("sincos_mlp")
class SinCosMLPPool(RankWeightedPool):
    """Synthetic-study generator "sin/cos + MLP": each position scored independently of the set size's
    other positions (an MLP on [PE(k), PE-of-size features]) — here the size enters through k / N.

    Args:
        d_pe: positional encoding size.
        d_hidden: MLP hidden size.
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32, tail_eps: float = 1e-6):
        super().__init__(tail_eps)
        self.d_pe = d_pe
        self.mlp = nn.Sequential(nn.Linear(d_pe + 1, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_hidden),
                                 nn.ReLU(), nn.Linear(d_hidden, 1, bias=False))

    def size_scores(self, sizes: torch.Tensor, n_max: int) -> torch.Tensor:
        device = self.mlp[0].weight.device
        sizes = sizes.to(device)
        pe = positional_encoding(n_max, self.d_pe, device).unsqueeze(0).expand(len(sizes), -1, -1)
        rel = torch.arange(n_max, device=device).unsqueeze(0) / sizes.unsqueeze(1).float()
        return self.mlp(torch.cat([pe, rel.unsqueeze(2)], dim=2)).squeeze(2)


@register_pooling("index_bigru")
class IndexBiGRUPool(RankWeightedPool):
    """Synthetic-study generator "index embedding + BiGRU": a learned embedding per position k (up to
    ``max_positions``) in place of the sin/cos encoding. Positions beyond the table share its last row,
    which is why this generator extrapolates poorly to larger sets.

    Args:
        d_embed: embedding size per position.
        d_hidden: BiGRU hidden size (directions averaged).
        max_positions: size of the position table.
    """

    def __init__(self, d_embed: int = 32, d_hidden: int = 32, max_positions: int = 128, tail_eps: float = 1e-6):
        super().__init__(tail_eps)
        self.max_positions = max_positions
        self.embed = nn.Embedding(max_positions, d_embed)
        self.gru = nn.GRU(d_embed, d_hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)

    def size_scores(self, sizes: torch.Tensor, n_max: int) -> torch.Tensor:
        device = self.linear.weight.device
        sizes = sizes.to(device)
        idx = torch.arange(n_max, device=device).clamp(max=self.max_positions - 1)
        emb = self.embed(idx).unsqueeze(0).expand(len(sizes), -1, -1)
        emb = emb * valid_mask(sizes, n_max).unsqueeze(2)
        return self.linear(packed_bigru(self.gru, emb, sizes)).squeeze(2)
