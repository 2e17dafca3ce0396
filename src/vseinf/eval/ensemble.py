"""Ensembles of several models (the paper's "Region+Grid"): averaged similarity matrices, or
concatenated embeddings whose dot products are the models' weighted summed similarity, so that an
ensemble ranks from embeddings block by block like one model (see :mod:`vseinf.eval.metrics`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from .metrics import _as_float_tensor, _shape_of

__all__ = ["ensemble_sims", "ensemble_embeddings"]


def ensemble_sims(list_of_sims: Sequence[Any]) -> Any:
    """Average several models' similarity matrices (the paper's "Region+Grid" ensembles).

    Returns a numpy array when every input is numpy, else a torch tensor (on the first
    tensor's device).

    Args:
        list_of_sims: two or more (n_images, n_texts) matrices of the same shape.
    """
    items = list(list_of_sims)
    if not items:
        raise ValueError("list_of_sims: is empty; give at least one similarity matrix")
    shape = _shape_of(items[0], "list_of_sims[0]")
    for k, s in enumerate(items[1:], start=1):
        if _shape_of(s, f"list_of_sims[{k}]") != shape:
            raise ValueError(
                f"list_of_sims[{k}]: has shape {tuple(s.shape)}, expected {shape} "
                "like list_of_sims[0]"
            )
    if all(isinstance(s, np.ndarray) for s in items):
        dtype = np.result_type(np.float32, *[s.dtype for s in items])
        total = np.zeros(shape, dtype=dtype)
        for s in items:
            total += s
        return total / len(items)
    device = next(s.device for s in items if isinstance(s, torch.Tensor))
    tensors = [_as_float_tensor(s).to(device) for s in items]
    total = torch.zeros(shape, dtype=tensors[0].dtype, device=device)
    for t in tensors:
        total = total + t
    return total / len(tensors)


def ensemble_embeddings(
    image_embs: Sequence[Any], text_embs: Sequence[Any], weights: Sequence[float] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of an ensemble, whose dot products are the models' weighted summed similarity.

    Model m's image embeddings are scaled by its weight ``w_m`` and the models' embeddings are
    concatenated along the feature axis, so ``image @ text.T = Σ_m w_m · image_m @ text_m.T``:
    the ensemble ranks from embeddings, block by block, like one model (the models may have
    different dimensions). Equal weights ``1/M`` (the default) average the similarities, as
    :func:`ensemble_sims` does with the matrices.

    Args:
        image_embs: M arrays (n_images, d_m), one per model (numpy or torch).
        text_embs: M arrays (n_texts, d_m), in the same model order.
        weights: M finite weights (default 1/M each).

    Returns:
        ``(image_emb, text_emb)``: float tensors (n_images, Σd_m) and (n_texts, Σd_m), on the
        first image embeddings' device.
    """
    images, texts = list(image_embs), list(text_embs)
    if not images:
        raise ValueError("image_embs: is empty; give the embeddings of at least one model")
    if len(texts) != len(images):
        raise ValueError(
            f"text_embs: has {len(texts)} models' embeddings but image_embs has {len(images)}"
        )
    if weights is None:
        weights = [1.0 / len(images)] * len(images)
    weights = [float(w) for w in weights]
    if len(weights) != len(images):
        raise ValueError(f"weights: has {len(weights)} entries for {len(images)} models")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights: must be finite numbers, got {weights}")
    n_images, _ = _shape_of(images[0], "image_embs[0]")
    n_texts, _ = _shape_of(texts[0], "text_embs[0]")
    device = images[0].device if isinstance(images[0], torch.Tensor) else torch.device("cpu")
    img_parts, txt_parts = [], []
    for m, (img, txt, w) in enumerate(zip(images, texts, weights)):
        rows_i, d_i = _shape_of(img, f"image_embs[{m}]")
        rows_t, d_t = _shape_of(txt, f"text_embs[{m}]")
        if rows_i != n_images:
            raise ValueError(f"image_embs[{m}]: has {rows_i} images, image_embs[0] has {n_images}")
        if rows_t != n_texts:
            raise ValueError(f"text_embs[{m}]: has {rows_t} texts, text_embs[0] has {n_texts}")
        if d_i != d_t:
            raise ValueError(
                f"text_embs[{m}]: has dimension {d_t} but image_embs[{m}] has dimension {d_i}"
            )
        img_parts.append(_as_float_tensor(img).to(device) * w)
        txt_parts.append(_as_float_tensor(txt).to(device))
    dtype = img_parts[0].dtype
    for t in img_parts + txt_parts:
        dtype = torch.promote_types(dtype, t.dtype)
    return (
        torch.cat([t.to(dtype) for t in img_parts], dim=1),
        torch.cat([t.to(dtype) for t in txt_parts], dim=1),
    )
