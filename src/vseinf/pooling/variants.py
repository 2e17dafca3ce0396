"""GPO's variants from the paper's supplementary material, each its own class.

* :class:`PerDimensionGPO` ("gpo-perdim", Table 7): one θ per feature dimension.
* :class:`FeatureGPO` ("gpo-features", Table 8): the generator also reads each rank's sorted values,
  so θ depends on the sample, not only on the set size.
* :class:`TransformerGPO` ("gpo-transformer", Table 3): a one-layer transformer encoder in place of
  the BiGRU.

The generators run in float32 even under autocast: θ is a softmax with temperature 0.1 over small
score differences, and ``nn.GRU`` has no bf16 autocast rule on the CPU. Each creates its modules in
the order the paper's GPO does (sequence model, then ``linear``), so a seed gives the same start.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .functional import check_set_batch, sorted_values, valid_mask
from .gpo import RankWeightedPool, positional_encoding
from .kernels import bigru_over_positions, on_one_thread, packed_bigru
from .registry import register_pooling

__all__ = ["PerDimensionGPO", "FeatureGPO", "TransformerGPO"]


def _float32(device) -> torch.autocast:
    """A context that runs the generator in float32 even under autocast."""
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    return torch.autocast(kind, enabled=False)


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(scores / T) over dim 1 (positions) of U × N [× P] scores; masked positions get 0."""
    if scores.dim() == 3:
        mask = mask.unsqueeze(2)
    return torch.softmax(scores.float().masked_fill(~mask, float("-inf")) / temperature, dim=1)


def _check_dim(expected: int, features: torch.Tensor, what: str) -> None:
    if features.shape[2] != expected:
        raise ValueError(f"this GPO was built with {what}={expected} but the features have dimension "
                         f"{features.shape[2]}")


def _positive_temperature(temperature) -> float:
    if not temperature > 0:
        raise ValueError(f"GPO temperature must be positive, got {temperature!r}")
    return float(temperature)


def _positive_dim(dim, what: str) -> int:
    if dim is None or int(dim) < 1:
        raise ValueError(f"GPO {what} must be a positive feature dimension, got {dim!r}")
    return int(dim)


@register_pooling("gpo-perdim", needs_dim=True)
class PerDimensionGPO(RankWeightedPool):
    """GPO whose linear layer emits D scores per rank: θ is U × N × D, one column per dimension.

    Args:
        per_dimension: the feature dimension D.
        d_pe, d_hidden, temperature: as for :class:`~vseinf.pooling.GPO`.
    """

    def __init__(self, per_dimension: int, d_pe: int = 32, d_hidden: int = 32, temperature: float = 0.1):
        super().__init__(tail_eps=0.0)
        self.per_dimension = _positive_dim(per_dimension, "per_dimension")
        self.d_pe, self.d_hidden, self.temperature = d_pe, d_hidden, _positive_temperature(temperature)
        self.gru = nn.GRU(d_pe, d_hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, self.per_dimension, bias=False)

    def size_scores(self, sizes: torch.Tensor, n_max: int) -> torch.Tensor:
        device = self.linear.weight.device
        with _float32(device):
            pe = positional_encoding(n_max, self.d_pe, device)
            return self.linear(bigru_over_positions(self.gru, pe, sizes.to(device)))  # U × N × D

    def coefficients(self, sizes: torch.Tensor, n_max: int | None = None) -> torch.Tensor:
        """θ for each size in ``sizes``: U × n_max × D."""
        sizes = torch.as_tensor(sizes, dtype=torch.long)
        n_max = int(sizes.max()) if n_max is None else n_max

        def theta() -> torch.Tensor:
            scores = self.size_scores(sizes, n_max)
            return _masked_softmax(scores, valid_mask(sizes.to(scores.device), n_max), self.temperature)

        return on_one_thread(theta, self.parameters())

    def forward(self, features: torch.Tensor, lengths=None):
        lengths = check_set_batch(features, lengths)
        _check_dim(self.per_dimension, features, "per_dimension")
        sizes, inverse = torch.unique(lengths, return_inverse=True)
        theta = self.coefficients(sizes, features.shape[1])[inverse]  # B × N × D
        values = sorted_values(features, lengths)
        pooled = (values * theta.to(values.dtype)).sum(1)
        return pooled, theta.mean(2).to(features.dtype)


@register_pooling("gpo-features", needs_dim=True)
class FeatureGPO(nn.Module):
    """GPO whose BiGRU reads, beside each rank's encoding, that rank's sorted values (a D-vector
    projected to ``d_feature`` numbers): θ is computed per sample.

    Args:
        feature_dim: the feature dimension D.
        d_pe, d_hidden, temperature: as for :class:`~vseinf.pooling.GPO`.
        d_feature: size the sorted values are projected to.
    """

    def __init__(self, feature_dim: int, d_pe: int = 32, d_hidden: int = 32, temperature: float = 0.1,
                 d_feature: int = 16):
        super().__init__()
        self.feature_dim = _positive_dim(feature_dim, "feature_dim")
        self.d_pe, self.d_hidden, self.temperature = d_pe, d_hidden, _positive_temperature(temperature)
        self.gru = nn.GRU(d_pe + d_feature, d_hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)
        self.feature_proj = nn.Linear(self.feature_dim, d_feature)

    def coefficients(self, sizes, n_max=None):
        raise ValueError("this GPO's coefficients depend on the feature values (feature_dim is set), "
                         "not only on the set size: call it on features instead")

    def forward(self, features: torch.Tensor, lengths=None):
        lengths = check_set_batch(features, lengths)
        _check_dim(self.feature_dim, features, "feature_dim")
        batch, n_max, _ = features.shape
        mask = valid_mask(lengths, n_max)
        values = sorted_values(features, lengths)  # B × N × D, descending per dimension, 0 on padding
        with _float32(features.device):
            pe = positional_encoding(n_max, self.d_pe, features.device).unsqueeze(0).expand(batch, -1, -1)
            inputs = torch.cat([pe, self.feature_proj(values.float())], dim=2)
            # θ depends on the sample: one generator pass per sample, packed to its own length.
            theta = _masked_softmax(self.linear(packed_bigru(self.gru, inputs, lengths)), mask,
                                    self.temperature)  # B × N × 1
        pooled = (values * theta.to(values.dtype)).sum(1)
        return pooled, theta.squeeze(2).to(features.dtype)


@register_pooling("gpo-transformer")
class TransformerGPO(RankWeightedPool):
    """GPO with a one-layer transformer encoder (width ``d_hidden``, 4 heads, no dropout) reading the
    rank encodings in place of the BiGRU; θ is shared by all dimensions, as in GPO.

    Args:
        d_pe, d_hidden, tail_eps, temperature: as for :class:`~vseinf.pooling.GPO`.
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32, tail_eps: float = 1e-6, temperature: float = 0.1):
        super().__init__(tail_eps)
        self.d_pe, self.d_hidden, self.temperature = d_pe, d_hidden, _positive_temperature(temperature)
        # The sin/cos inputs already carry the positions; no dropout (the GRU has none).
        self.transformer_in = nn.Linear(d_pe, d_hidden)
        self.transformer = nn.TransformerEncoderLayer(d_hidden, nhead=4 if d_hidden % 4 == 0 else 1,
                                                      dim_feedforward=2 * d_hidden, dropout=0.0,
                                                      batch_first=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)

    def size_scores(self, sizes: torch.Tensor, n_max: int) -> torch.Tensor:
        device = self.linear.weight.device
        sizes = sizes.to(device)
        with _float32(device):
            inputs = positional_encoding(n_max, self.d_pe, device).unsqueeze(0).expand(len(sizes), -1, -1)
            hidden = self.transformer(self.transformer_in(inputs),
                                      src_key_padding_mask=~valid_mask(sizes, n_max))
            return self.linear(hidden).squeeze(2)
