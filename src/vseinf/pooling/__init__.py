"""Pooling over sets of vectors: the Generalized Pooling Operator (GPO) and its baselines.

Every pooling layer has the same interface::

    pooled, weights = pool(features, lengths)

``features`` is a padded batch of sets (B × N × D, float), ``lengths`` the number of valid elements
of each set (B, integers in 1..N); padding (even NaN or inf) never changes a result. ``pooled`` is
B × D; ``weights`` (B × N) is the coefficient of each *sorted* rank (k-th largest value of each
dimension) for the rank-weighted pools, or of each element for the attention-style ones; zero on
padding. ``build_pooling(name, dim)`` makes one by its registered name.

Modules: ``gpo`` (the paper's GPO, one screen), ``kernels`` (the sort-and-sum and BiGRU fast paths
it calls, beside their slow twins), ``reference`` (``GPOReference``, the test oracle), ``variants``
(GPO's supplementary variants), ``fixed`` (avg, max, K-max, first element), ``baselines`` (the
study's other learned aggregators), ``branches`` (several poolings side by side: "gpo+max"),
``augment`` (set-size augmentation), ``functional`` (masks, checks), ``registry``,
``coefficients`` (θ over sorted positions for given set sizes, for plots).
The package imports nothing else from vseinf: it is a plug-and-play layer.
"""

from __future__ import annotations

from .augment import host_rand, size_augment
from .baselines import FSPool, GeMPool, IndexBiGRUPool, InterpolatedIndexPool, SelfAttentionPool, SinCosMLPPool
from .branches import BranchPool, split_branches
from .coefficients import pooling_coefficients
from .fixed import AvgPool, ClsPool, KMaxPool, MaxPool
from .functional import check_set_batch, l2norm, sorted_values, valid_mask
from .gpo import GPO, RankWeightedPool, positional_encoding
from .kernels import rank_weighted_sum, rank_weighted_sum_reference
from .reference import GPOReference
from .registry import build_pooling, pooling_names, register_pooling
from .variants import FeatureGPO, PerDimensionGPO, TransformerGPO

# Every name registered by the modules above, in registration order ("kmax:K" for K-max).
POOLING_NAMES = pooling_names()

__all__ = [
    "l2norm", "positional_encoding", "check_set_batch", "valid_mask", "sorted_values",
    "RankWeightedPool", "GPO", "GPOReference", "PerDimensionGPO", "FeatureGPO", "TransformerGPO",
    "AvgPool", "MaxPool", "KMaxPool", "ClsPool", "GeMPool", "FSPool", "SelfAttentionPool",
    "InterpolatedIndexPool", "SinCosMLPPool", "IndexBiGRUPool",
    "rank_weighted_sum", "rank_weighted_sum_reference", "host_rand", "size_augment",
    "BranchPool", "split_branches",
    "register_pooling", "build_pooling", "pooling_names", "POOLING_NAMES", "pooling_coefficients",
]
