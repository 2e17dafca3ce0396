"""Set-size augmentation: randomly drop set elements in training so the pooling sees many set sizes."""

from __future__ import annotations

import torch

from .functional import check_set_batch, valid_mask

__all__ = ["host_rand", "size_augment"]


def host_rand(*shape: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """``torch.rand`` drawn on the CPU (from ``generator``, else torch's CPU RNG), then moved to
    ``device``. Augmentations draw this way so that a run makes the same draws on any device, a
    CPU generator also works for GPU tensors, and a resume only needs the CPU RNG states."""
    return torch.rand(*shape, generator=generator).to(device)


def size_augment(features: torch.Tensor, lengths, mode: str = "region", p: float = 0.2,
                 generator: torch.Generator | None = None):
    """Randomly drop set elements (training only) so the pooling sees many set sizes (recipe §2).

    Args:
        features: B × N × D padded sets.
        lengths: valid sizes (B).
        mode: "region" drops each element with probability ``p``; "grid" does so for a random 80% of
            the samples, each with its own rate ``p · r``, r ~ U(0.2, 1]; "none" returns the input.
        p: base drop probability.
        generator: optional CPU torch.Generator for reproducibility (see :func:`host_rand`).

    Returns:
        (features, lengths): kept elements moved to the front in their original order, the rest
        zero padding; at least one element of every set is kept.
    """
    lengths = check_set_batch(features, lengths)
    if mode not in ("region", "grid", "none"):
        raise ValueError(f"size_augment mode must be 'region', 'grid' or 'none', got {mode!r}")
    if mode == "none" or p <= 0:
        return features, lengths
    batch, n_max, _ = features.shape
    device = features.device
    if mode == "region":
        rate = torch.full((batch, 1), float(p), device=device)
    else:  # grid
        r = 1.0 - 0.8 * host_rand(batch, 1, generator=generator, device=device)  # U(0.2, 1]
        apply = host_rand(batch, 1, generator=generator, device=device) < 0.8
        rate = torch.where(apply, p * r, torch.zeros_like(r))
    mask = valid_mask(lengths, n_max)
    keep = (host_rand(batch, n_max, generator=generator, device=device) >= rate) & mask
    # Never empty a set: keep one random valid element where everything was dropped.
    empty = keep.sum(1) == 0
    if empty.any():
        pick = (host_rand(batch, generator=generator, device=device) * lengths).long()
        keep[empty, pick[empty]] = True
    new_lengths = keep.sum(1)
    # Stable compaction: kept elements first, in order.
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    compact = features.gather(1, order.unsqueeze(2).expand(-1, -1, features.shape[2]))
    compact = compact.masked_fill(~valid_mask(new_lengths, n_max).unsqueeze(2), 0.0)
    n_new = int(new_lengths.max())
    return compact[:, :n_new], new_lengths
