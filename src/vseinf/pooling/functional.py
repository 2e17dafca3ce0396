"""Padded set batches: input checks, masks, per-dimension sorting, l2 normalisation.

A padded batch of sets is ``features`` (B × N × D, float) with ``lengths`` (B, integers in 1..N);
elements at index >= lengths[b] are padding, and their values (even NaN or inf) never change a result.
"""

from __future__ import annotations

import torch

__all__ = ["l2norm", "check_set_batch", "valid_mask", "sorted_values"]


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Scale ``x`` to unit l2 norm along ``dim`` (zero vectors stay zero)."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(eps)


def check_set_batch(features: torch.Tensor, lengths) -> torch.Tensor:
    """Validate a padded set batch; return ``lengths`` as a LongTensor on the features' device.

    Raises ValueError saying what was expected, so a user never gets a shape error from deep inside.
    """
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"features must be a torch.Tensor of shape B×N×D, got {type(features).__name__}")
    if features.dim() != 3:
        raise ValueError(f"features must have 3 dimensions (B×N×D), got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"features must be a floating-point tensor, got dtype {features.dtype}")
    batch, n_max, _ = features.shape
    if lengths is None:
        return torch.full((batch,), n_max, dtype=torch.long, device=features.device)
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.is_floating_point():
        if not torch.equal(lengths, lengths.round()):
            raise ValueError("lengths must be whole numbers")
    elif lengths.dtype == torch.bool or lengths.is_complex():
        raise ValueError(f"lengths must be integers, got dtype {lengths.dtype}")
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"lengths must have shape ({batch},) to match features {tuple(features.shape)}, "
                         f"got {tuple(lengths.shape)}")
    lengths = lengths.to(device=features.device, dtype=torch.long)
    if batch:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > n_max:
            raise ValueError(f"every length must be in 1..N={n_max} (the set dimension of features), "
                             f"got values in {lo}..{hi}")
    return lengths


def valid_mask(lengths: torch.Tensor, n_max: int) -> torch.Tensor:
    """B × n_max boolean mask, True at valid (non-padding) positions."""
    return torch.arange(n_max, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def sorted_values(features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each dimension's valid values in descending order (B × N × D), zero at the padded ranks.

    Differentiable (through ``sort``); padding, even NaN, gets no gradient because it is replaced
    before the sort and after it.
    """
    mask = valid_mask(lengths, features.shape[1]).unsqueeze(2)
    values = features.masked_fill(~mask, float("-inf")).sort(dim=1, descending=True).values
    return values.masked_fill(~mask, 0.0)
