"""θ over sorted positions for given set sizes: what a pooling learned, as the paper's Figure 5
draws it (``vseinf plot-pooling``) and the web app's ``/api/gpo`` serves it."""

from __future__ import annotations

import torch

from .baselines import FSPool
from .branches import BranchPool
from .fixed import AvgPool, KMaxPool, MaxPool


@torch.no_grad()
def pooling_coefficients(pool, sizes: list[int]) -> torch.Tensor:
    """θ (len(sizes) × max(sizes)) of a pooling whose coefficients depend only on the set size.

    GPO-like pools give them directly; one θ per dimension (``gpo-perdim``) or FSPool curves are
    averaged over the dimensions. Fixed pools (avg, max, K-max) are probed with a random set of each
    size. Pools whose weights depend on the values (attention, GeM, cls, ``gpo-features``) have no
    such coefficients: ValueError. A branched pool ("gpo+max") shows its first branch.
    """
    if isinstance(pool, BranchPool):
        pool = pool.branches[0]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"set sizes must be positive integers, got {sizes}")
    n_max = max(sizes)
    sizes_t = torch.tensor(sizes, dtype=torch.long)
    if isinstance(pool, FSPool):
        return pool.curves(sizes_t, n_max).mean(2).float().cpu()
    if hasattr(pool, "coefficients") and getattr(pool, "feature_dim", None) is None:
        theta = pool.coefficients(sizes_t, n_max).float().cpu()
        return theta.mean(2) if theta.dim() == 3 else theta
    if isinstance(pool, (AvgPool, MaxPool, KMaxPool)):
        probe = torch.randn(len(sizes), n_max, 1, generator=torch.Generator().manual_seed(0))
        return pool(probe, sizes_t)[1].float().cpu()
    raise ValueError(f"{type(pool).__name__} has no coefficients that depend only on the set size "
                     "(its weights depend on the feature values); nothing to plot")
