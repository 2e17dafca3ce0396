"""Training objectives for the two towers: the VSE++ hinge triplet loss and InfoNCE.

Both take l2-normalised embeddings ``img`` and ``txt`` (G × d; row i of each is a positive
pair) and ``image_ids`` (G): rows with equal ids show the same image, so their pairs are
positives and never negatives. The authors' code treats a second caption of the same image in
the batch as a negative; we mask it (docs/recipe.md §4).

Multi-process training: each rank gathers the global batch with :func:`gather_batch` (or
:func:`gather_with_grad`), so hardest negatives and softmaxes range over every rank's rows. The
gather's backward sends each rank the gradient of its own rows summed over all ranks. Two ways to
use it, both exact:

- every rank computes the loss of the whole global batch (what ``vseinf train`` does, like
  open_clip): the ranks' row gradients are equal, their sum is world size × the single-process
  one, and DistributedDataParallel's average over ranks divides that out again;
- every rank computes the loss of its own rows only (``local_rows``, each row an anchor against
  the whole global batch): both losses are sums over anchors (InfoNCE is divided by the *global*
  batch size), so the ranks' losses and gradients add up to the single-process ones.

This module imports only torch and the pooling package (to split a branched model's embeddings).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .pooling.branches import split_branches

__all__ = [
    "hinge_triplet_loss",
    "hinge_triplet_loss_reference",
    "info_nce_loss",
    "info_nce_loss_reference",
    "VSELoss",
    "gather_with_grad",
    "gather_batch",
]

# CLIP's initial temperature 0.07, stored as the log of the inverse.
DEFAULT_LOGIT_SCALE = math.log(1 / 0.07)


# ---------------------------------------------------------------------------------------------
# Input handling shared by the losses
# ---------------------------------------------------------------------------------------------


def _check_pair(img: torch.Tensor, txt: torch.Tensor) -> int:
    for name, t in (("img", img), ("txt", txt)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a 2-D tensor (batch × dim), got {shape}")
    if img.shape != txt.shape:
        raise ValueError(
            f"txt: has shape {tuple(txt.shape)} but img has {tuple(img.shape)}; "
            "row i of each must be a positive pair"
        )
    return int(img.shape[0])


def _image_ids(image_ids: Any, n: int, device: torch.device) -> torch.Tensor:
    """The ids as a 1-D tensor on ``device``; ``None`` means every row is a different image."""
    if image_ids is None:
        return torch.arange(n, device=device)
    ids = torch.as_tensor(image_ids, device=device)
    if ids.ndim != 1 or ids.shape[0] != n:
        raise ValueError(
            f"image_ids: expected {n} ids (one per row), got shape {tuple(ids.shape)}"
        )
    return ids


def _rows(local_rows: slice | None, n: int) -> slice:
    """The anchor rows as a normalised slice ``start:stop`` (whole batch by default)."""
    if local_rows is None:
        return slice(0, n)
    if not isinstance(local_rows, slice):
        raise ValueError(f"local_rows: expected a slice or None, got {type(local_rows).__name__}")
    start, stop, step = local_rows.indices(n)
    if step != 1:
        raise ValueError(f"local_rows: step must be 1, got {local_rows.step}")
    return slice(start, max(start, stop))


def _anchor_scores(img, txt, ids, rows):
    """Scores of the anchor rows against the whole batch, and which pairs to leave out.

    Returns ``s_i2t`` (b × G, anchor image vs every text), ``s_t2i`` (b × G, anchor text vs
    every image), ``own`` (the column of each anchor's positive), and ``same`` (b × G, the
    pair shows the anchor's image, positive included).
    """
    n = img.shape[0]
    if rows.start == 0 and rows.stop == n:
        s_i2t = img @ txt.T
        s_t2i = s_i2t.T  # one matrix product serves both directions
    else:
        s_i2t = img[rows] @ txt.T
        s_t2i = txt[rows] @ img.T
    own = torch.arange(rows.start, rows.stop, device=img.device)
    same = ids[rows][:, None] == ids[None, :]
    return s_i2t, s_t2i, own, same


# ---------------------------------------------------------------------------------------------
# VSE++ hinge triplet loss
# ---------------------------------------------------------------------------------------------


def hinge_triplet_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    image_ids: Any = None,
    margin: float = 0.2,
    hardest: bool = True,
    local_rows: slice | None = None,
) -> torch.Tensor:
    """VSE++ loss ``[α − s(i,t) + s(i,t̂)]₊ + [α − s(i,t) + s(î,t)]₊``, summed over the batch.

    Args:
        img: (G, d) l2-normalised image embeddings; row i pairs with ``txt[i]``.
        txt: (G, d) l2-normalised text embeddings.
        image_ids: (G,) ids; rows with equal ids are never each other's negatives.
            ``None``: every row is a different image.
        margin: the hinge margin α.
        hardest: True takes only the hardest negative per anchor (VSE++); False sums over all
            negatives (the first-epoch warm-up).
        local_rows: anchor rows this process owns (distributed training); default all rows.
    """
    n = _check_pair(img, txt)
    ids = _image_ids(image_ids, n, img.device)
    rows = _rows(local_rows, n)
    s_i2t, s_t2i, own, same = _anchor_scores(img, txt, ids, rows)
    k = torch.arange(own.numel(), device=img.device)
    # Image anchors against every text, then text anchors against every image.
    cost_s = (margin + s_i2t - s_i2t[k, own][:, None]).clamp(min=0).masked_fill(same, 0)
    cost_im = (margin + s_t2i - s_t2i[k, own][:, None]).clamp(min=0).masked_fill(same, 0)
    if hardest:
        # A fully masked row (all G rows show one image) has max 0: no negative, no loss.
        return cost_s.max(dim=1).values.sum() + cost_im.max(dim=1).values.sum()
    return cost_s.sum() + cost_im.sum()


def hinge_triplet_loss_reference(
    img: torch.Tensor,
    txt: torch.Tensor,
    image_ids: Any = None,
    margin: float = 0.2,
    hardest: bool = True,
) -> torch.Tensor:
    """:func:`hinge_triplet_loss` written pair by pair with python loops (slow; for tests)."""
    n = _check_pair(img, txt)
    ids = _image_ids(image_ids, n, img.device).tolist()
    total = img.new_zeros(())
    for a in range(n):
        positive = torch.dot(img[a], txt[a])
        # The anchor image a against captions of other images ...
        to_texts = [
            torch.relu(margin - positive + torch.dot(img[a], txt[j]))
            for j in range(n)
            if ids[j] != ids[a]
        ]
        # ... and the anchor caption a against other images.
        to_images = [
            torch.relu(margin - positive + torch.dot(img[j], txt[a]))
            for j in range(n)
            if ids[j] != ids[a]
        ]
        for costs in (to_texts, to_images):
            if costs:
                total = total + (max(costs) if hardest else sum(costs))
    return total


# ---------------------------------------------------------------------------------------------
# InfoNCE (CLIP-style, with a learnable temperature)
# ---------------------------------------------------------------------------------------------


def info_nce_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    image_ids: Any = None,
    logit_scale: torch.Tensor | float = DEFAULT_LOGIT_SCALE,
    local_rows: slice | None = None,
    max_scale: float = 100.0,
) -> torch.Tensor:
    """Symmetric cross-entropy over the batch, other captions of the same image left out.

    The loss is ``(Σ_anchors CE_image→text + Σ_anchors CE_text→image) / (2·G)`` with G the
    global batch size, i.e. CLIP's mean; dividing by G rather than by the local row count keeps
    the per-rank losses summing to the single-process loss.

    Args:
        img: (G, d) l2-normalised image embeddings; row i pairs with ``txt[i]``.
        txt: (G, d) l2-normalised text embeddings.
        image_ids: (G,) ids; a same-image pair other than the anchor's own is removed from the
            softmax (neither positive nor negative). ``None``: all rows differ.
        logit_scale: log of the inverse temperature (learnable; CLIP starts at log(1/0.07)).
        local_rows: anchor rows this process owns (distributed training); default all rows.
        max_scale: the inverse temperature is clamped at this value (CLIP: 100).
    """
    n = _check_pair(img, txt)
    ids = _image_ids(image_ids, n, img.device)
    rows = _rows(local_rows, n)
    s_i2t, s_t2i, own, same = _anchor_scores(img, txt, ids, rows)
    scale = torch.as_tensor(logit_scale, dtype=img.dtype, device=img.device).exp()
    scale = scale.clamp(max=max_scale)
    k = torch.arange(own.numel(), device=img.device)
    not_in_softmax = same.clone()
    not_in_softmax[k, own] = False  # the anchor's own pair stays: it is the target
    loss = img.new_zeros(())
    for s in (s_i2t, s_t2i):
        logits = (scale * s).masked_fill(not_in_softmax, -math.inf)
        loss = loss + F.cross_entropy(logits, own, reduction="sum")
    return loss / (2 * n)


def info_nce_loss_reference(
    img: torch.Tensor,
    txt: torch.Tensor,
    image_ids: Any = None,
    logit_scale: torch.Tensor | float = DEFAULT_LOGIT_SCALE,
    max_scale: float = 100.0,
) -> torch.Tensor:
    """:func:`info_nce_loss` written anchor by anchor with python loops (slow; for tests)."""
    n = _check_pair(img, txt)
    ids = _image_ids(image_ids, n, img.device).tolist()
    scale = torch.as_tensor(logit_scale, dtype=img.dtype).exp().clamp(max=max_scale)
    total = img.new_zeros(())
    for a in range(n):
        # Candidates: the anchor's own pair and every row of a different image.
        keep = [j for j in range(n) if j == a or ids[j] != ids[a]]
        for score in (lambda j: torch.dot(img[a], txt[j]), lambda j: torch.dot(img[j], txt[a])):
            logits = torch.stack([scale * score(j) for j in keep])
            total = total + torch.logsumexp(logits, dim=0) - scale * score(a)
    return total / (2 * n)


# ---------------------------------------------------------------------------------------------
# One module for the trainer
# ---------------------------------------------------------------------------------------------


class VSELoss(nn.Module):
    """The training loss: hinge triplet (VSE++, the paper's) or InfoNCE.

    Holds no parameters: InfoNCE's learnable temperature belongs to the model
    (``VSEModel.logit_scale``, returned by its forward) and is passed in.

    Args:
        kind: ``"hinge"`` or ``"infonce"``.
        margin: hinge margin α (hinge only).
        max_scale: clamp of the inverse temperature (infonce only).
        branches: K > 1 for a model with a branched pooling ("gpo+max"): the embeddings hold K
            unit vectors (one per slice, see :class:`vseinf.pooling.BranchPool`) and the loss is
            the sum of each branch's loss, so the branches train as K separate models would.
    """

    def __init__(self, kind: str = "hinge", margin: float = 0.2, max_scale: float = 100.0,
                 branches: int = 1) -> None:
        super().__init__()
        if kind not in ("hinge", "infonce"):
            raise ValueError(f"kind: expected 'hinge' or 'infonce', got {kind!r}")
        if not margin >= 0:
            raise ValueError(f"margin: expected a non-negative number, got {margin!r}")
        if not max_scale > 0:
            raise ValueError(f"max_scale: expected a positive number, got {max_scale!r}")
        self.kind = kind
        self.margin = float(margin)
        self.max_scale = float(max_scale)
        if int(branches) < 1:
            raise ValueError(f"branches: expected a positive integer, got {branches!r}")
        self.branches = int(branches)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        image_ids: Any = None,
        warmup: bool = False,
        local_rows: slice | None = None,
        logit_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of a batch.

        Args:
            img: (G, d) l2-normalised image embeddings; row i pairs with ``txt[i]``.
            txt: (G, d) l2-normalised text embeddings.
            image_ids: (G,) ids marking rows of the same image; ``None``: all differ.
            warmup: hinge: sum over all negatives instead of the hardest (first epoch);
                ignored by InfoNCE, which always uses every negative.
            local_rows: anchor rows this process owns (distributed training, see the module notes).
            logit_scale: InfoNCE's log inverse temperature (the model's ``logit_scale``); required
                by InfoNCE, ignored by the hinge loss.
        """
        if self.branches > 1:
            return sum(self._loss(i, t, image_ids, warmup, local_rows, logit_scale)
                       for i, t in zip(split_branches(img, self.branches), split_branches(txt, self.branches)))
        return self._loss(img, txt, image_ids, warmup, local_rows, logit_scale)

    def _loss(self, img, txt, image_ids, warmup, local_rows, logit_scale) -> torch.Tensor:
        if self.kind == "hinge":
            return hinge_triplet_loss(
                img, txt, image_ids, self.margin, hardest=not warmup, local_rows=local_rows
            )
        if logit_scale is None:
            raise ValueError("logit_scale: InfoNCE needs the model's temperature (VSEModel.logit_scale)")
        return info_nce_loss(
            img, txt, image_ids, logit_scale, local_rows=local_rows, max_scale=self.max_scale
        )

    def extra_repr(self) -> str:
        branches = f", branches={self.branches}" if self.branches > 1 else ""
        return f"kind={self.kind!r}, margin={self.margin}{branches}"


# ---------------------------------------------------------------------------------------------
# Global batches across processes
# ---------------------------------------------------------------------------------------------


def _world(group: Any = None) -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not in use."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _gather_sizes(n: int, device: torch.device, group: Any) -> list[int]:
    _, world = _world(group)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s.item()) for s in sizes]


def _all_gather_rows(x: torch.Tensor, sizes: list[int], group: Any) -> torch.Tensor:
    """Concatenate every rank's rows (ranks may hold different row counts)."""
    # all_gather needs equal shapes: pad to the largest rank, then cut the padding off.
    longest = max(sizes)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each rank the gradient of ITS rows from every rank.

    The common shortcut (gather without gradient, then put the local tensor back into its own
    slice) only keeps the gradient of this rank's own loss. With ``local_rows`` the other ranks'
    losses also depend on this rank's rows (as negatives), and with the whole loss on every rank
    DDP's average would leave 1/world of the gradient. Summing the gathered gradient over ranks
    (all_reduce) and keeping our slice is exact in both uses (see the module notes).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int, group: Any) -> torch.Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        gathered = _all_gather_rows(x.detach(), sizes, group)
        start = sum(sizes[:rank])
        # Our own slice is the local tensor itself (bit-identical; no round trip).
        gathered[start : start + sizes[rank]] = x.detach()
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


def gather_with_grad(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Rows of ``x`` from every rank, concatenated in rank order, differentiable.

    The identity when torch.distributed is not initialised (or has one process). Ranks may
    hold different numbers of rows. Every rank must call this, and later ``backward``, in the
    same order (the backward pass is a collective too).

    Args:
        x: (n_local, ...) this rank's rows.
        group: process group (default: the world).
    """
    rank, world = _world(group)
    if world == 1:
        return x
    sizes = _gather_sizes(x.shape[0], x.device, group)
    return _GatherWithGrad.apply(x, sizes, rank, group)


def gather_batch(
    img: torch.Tensor, txt: torch.Tensor, image_ids: Any = None, group: Any = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, slice]:
    """The global batch and this rank's rows in it, ready for the losses' ``local_rows``.

    ``image_ids`` must be global (e.g. dataset image indices), so that two ranks' captions of
    one image are recognised as the same image. Without a process group this returns the
    inputs and ``slice(0, n)``.

    Args:
        img: (n_local, d) this rank's image embeddings.
        txt: (n_local, d) this rank's text embeddings.
        image_ids: (n_local,) image ids; ``None``: ids are row positions in the global batch.
        group: process group (default: the world).

    Returns:
        ``(img_all, txt_all, image_ids_all, local_rows)``.
    """
    n = _check_pair(img, txt)
    rank, world = _world(group)
    if world == 1:
        return img, txt, _image_ids(image_ids, n, img.device), slice(0, n)
    sizes = _gather_sizes(n, img.device, group)
    start = sum(sizes[:rank])
    if image_ids is None:
        ids_all = torch.arange(sum(sizes), device=img.device)
    else:
        ids_all = _all_gather_rows(_image_ids(image_ids, n, img.device), sizes, group)
    img_all = _GatherWithGrad.apply(img, sizes, rank, group)
    txt_all = _GatherWithGrad.apply(txt, sizes, rank, group)
    return img_all, txt_all, ids_all, slice(start, start + n)
