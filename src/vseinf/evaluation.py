"""Cross-modal retrieval metrics: Recall@K, median and mean rank, RSUM, and the usual protocols.

The community's definitions (VSE++, SCAN, VSE∞) are kept exactly:

* ``r`` is the 0-based rank of the first correct item for a query.
  Text → image: the rank of the text's own image among all images.
  Image → text: an image is correct at K when ANY of its captions is in the top K, so ``r`` is
  the rank of its best-ranked caption.
* ``R@K = 100 · mean(r < K)``; ``medr = floor(median r) + 1``; ``meanr = mean r + 1``;
  ``rsum`` is the sum of the six recalls.

The fast paths never sort. A rank is a count: for text j, ``r_j`` is the number of images that
score strictly higher with j than j's own image; for image i, ``r_i`` is the number of texts that
score strictly higher than i's best-scoring caption. Ties therefore count in the query's favour
(a negative that exactly ties the positive does not push it down). An argsort evaluation places
tied items in an arbitrary order, so the two only agree when there are no exact ties, which is the
case for real-valued scores in practice; :func:`rank_details_reference` is that slow argsort
evaluation, kept as the oracle for the fast one.

Everything works in chunks so memory stays bounded: :func:`retrieval_metrics` walks a given
similarity matrix a block of image rows at a time, and :func:`retrieval_metrics_from_embeddings`
never builds the full matrix at all (100,000 images × 500,000 texts would be 200 GB of float32),
scoring one image-chunk × text-chunk block at a time on the embeddings' device.

This module imports only numpy and torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

__all__ = [
    "METRIC_KEYS",
    "RankDetails",
    "retrieval_metrics",
    "retrieval_metrics_from_embeddings",
    "retrieval_metrics_reference",
    "rank_details",
    "rank_details_from_embeddings",
    "rank_details_reference",
    "metrics_from_ranks",
    "evaluate_protocol",
    "evaluate_protocol_from_embeddings",
    "ensemble_sims",
    "round_metrics",
    "format_table",
]

METRIC_KEYS = (
    "i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
    "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr",
    "rsum",
)  # fmt: skip

# Image rows per block when a full similarity matrix is given (a block is rows × n_texts).
DEFAULT_SIMS_CHUNK = 1024
# Block side when scoring from embeddings (a block is chunk × chunk scores).
DEFAULT_EMB_CHUNK = 4096


# ---------------------------------------------------------------------------------------------
# Per-query ranks and the metrics computed from them
# ---------------------------------------------------------------------------------------------


@dataclass
class RankDetails:
    """Per-query results of one evaluation (all int64 numpy arrays).

    Args:
        i2t_ranks: (n_images,) 0-based rank of each image's best-ranked caption.
        i2t_top1: (n_images,) index of the text that scores highest with each image.
        t2i_ranks: (n_texts,) 0-based rank of each text's own image.
        t2i_top1: (n_texts,) index of the image that scores highest with each text.
    """

    i2t_ranks: np.ndarray
    i2t_top1: np.ndarray
    t2i_ranks: np.ndarray
    t2i_top1: np.ndarray

    def metrics(self) -> dict[str, float]:
        """The metric table of these ranks (see :func:`metrics_from_ranks`)."""
        return metrics_from_ranks(self.i2t_ranks, self.t2i_ranks)


def metrics_from_ranks(i2t_ranks: Any, t2i_ranks: Any) -> dict[str, float]:
    """Recall@1/5/10 (percent), medr, meanr per direction and their RSUM, from 0-based ranks.

    Args:
        i2t_ranks: 0-based rank of each image query's first correct caption.
        t2i_ranks: 0-based rank of each text query's image.
    """
    out: dict[str, float] = {}
    for prefix, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        r = np.asarray(ranks, dtype=np.float64)
        if r.ndim != 1 or r.size == 0:
            raise ValueError(f"{prefix}_ranks: expected a non-empty 1-D array, got shape {r.shape}")
        for k in (1, 5, 10):
            out[f"{prefix}_r{k}"] = float(100.0 * np.mean(r < k))
        out[f"{prefix}_medr"] = float(np.floor(np.median(r)) + 1)
        out[f"{prefix}_meanr"] = float(r.mean() + 1)
    out["rsum"] = float(sum(out[f"{p}_r{k}"] for p in ("i2t", "t2i") for k in (1, 5, 10)))
    # Stable key order, the same as METRIC_KEYS.
    return {key: out[key] for key in METRIC_KEYS}


# ---------------------------------------------------------------------------------------------
# Input checks shared by every entry point
# ---------------------------------------------------------------------------------------------


def _check_text_to_image(text_to_image: Any, n_images: int, n_texts: int) -> np.ndarray:
    """Validate the text → image map and return it as an int64 numpy array."""
    if isinstance(text_to_image, torch.Tensor):
        arr = text_to_image.detach().cpu().numpy()
    else:
        arr = np.asarray(text_to_image)
    if arr.ndim != 1:
        raise ValueError(
            f"text_to_image: expected a 1-D sequence of image indices, got shape {arr.shape}"
        )
    if arr.shape[0] != n_texts:
        raise ValueError(
            f"text_to_image: has {arr.shape[0]} entries but there are {n_texts} texts"
        )
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"text_to_image: must hold integer image indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    bad = np.flatnonzero((arr < 0) | (arr >= n_images))
    if bad.size:
        j = int(bad[0])
        raise ValueError(
            f"text_to_image: entry {j} is {int(arr[j])}, outside the image range [0, {n_images})"
        )
    # Image → text ranks are undefined for an image without any caption.
    missing = np.flatnonzero(np.bincount(arr, minlength=n_images) == 0)
    if missing.size:
        raise ValueError(
            f"text_to_image: image {int(missing[0])} has no caption "
            f"({missing.size} of {n_images} images have none); every image needs at least one"
        )
    return arr


def _check_chunk_size(chunk_size: int) -> int:
    is_int = isinstance(chunk_size, (int, np.integer)) and not isinstance(chunk_size, bool)
    if not is_int or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size!r}")
    return int(chunk_size)


def _shape_of(x: Any, name: str) -> tuple[int, int]:
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        raise ValueError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array, got shape {tuple(x.shape)}")
    rows, cols = int(x.shape[0]), int(x.shape[1])
    if rows == 0 or cols == 0:
        raise ValueError(f"{name}: is empty (shape {tuple(x.shape)})")
    return rows, cols


def _as_float_tensor(x: Any) -> torch.Tensor:
    """A torch view of x when possible (no copy for writable numpy arrays), floating point."""
    if isinstance(x, np.ndarray):
        # torch.from_numpy warns on read-only arrays (e.g. memory maps); copy those instead.
        t = torch.from_numpy(x) if x.flags.writeable else torch.tensor(x)
    else:
        t = x.detach()
    if not torch.is_floating_point(t):
        t = t.to(torch.float64)
    return t


# ---------------------------------------------------------------------------------------------
# Fast path 1: a similarity matrix is given
# ---------------------------------------------------------------------------------------------


def _update_column_top1(
    block: torch.Tensor, row_offset: int, col_best: torch.Tensor, col_top1: torch.Tensor
) -> torch.Tensor:
    """Fold a block of rows into running column maxima and argmaxima (both updated in place).

    ``max(dim=0)`` with indices is several times slower than ``amax`` on CPU, and after the
    first few blocks only a few columns find a new maximum, so the argmax is taken only for
    those columns. Strict ">" keeps the earliest block on ties. Returns the block's maxima.
    """
    values = block.amax(dim=0)
    improved = (values > col_best).nonzero().squeeze(1)
    if improved.numel():
        col_best[improved] = values[improved]
        col_top1[improved] = block.T[improved].argmax(dim=1) + row_offset
    return values


@torch.no_grad()
def rank_details(
    sims: Any, text_to_image: Any, chunk_size: int = DEFAULT_SIMS_CHUNK
) -> RankDetails:
    """Per-query ranks and top-1 indices of an (n_images × n_texts) similarity matrix.

    Counts instead of sorting (see the module docstring; ties count in the query's favour) and
    works on ``chunk_size`` image rows at a time, on the matrix's own device for tensors.

    Args:
        sims: (n_images, n_texts) scores, numpy array or torch tensor (a memory map is fine).
        text_to_image: (n_texts,) integer image index of each text.
        chunk_size: image rows per block; extra memory is about chunk_size × n_texts bytes × 6.
    """
    n_images, n_texts = _shape_of(sims, "sims")
    chunk_size = _check_chunk_size(chunk_size)
    t2i_np = _check_text_to_image(text_to_image, n_images, n_texts)
    device = sims.device if isinstance(sims, torch.Tensor) else torch.device("cpu")
    t2i = torch.from_numpy(t2i_np).to(device)
    text_idx = torch.arange(n_texts, device=device)

    # The positive score of every text, read from the matrix itself so that the comparisons
    # below see bit-identical numbers (a text never "beats" its own score).
    if isinstance(sims, np.ndarray):
        pos = _as_float_tensor(np.ascontiguousarray(sims[t2i_np, np.arange(n_texts)])).to(device)
    else:
        pos = _as_float_tensor(sims[t2i, text_idx])
    if torch.isnan(pos).any():
        raise ValueError("sims: contains NaN scores")
    # Each image's best caption score: the threshold its image → text rank counts against.
    best = torch.full((n_images,), -math.inf, dtype=pos.dtype, device=device)
    best.scatter_reduce_(0, t2i, pos, reduce="amax")

    i2t_ranks = torch.empty(n_images, dtype=torch.int64, device=device)
    i2t_top1 = torch.empty(n_images, dtype=torch.int64, device=device)
    t2i_ranks = torch.zeros(n_texts, dtype=torch.int64, device=device)
    col_best = torch.full((n_texts,), -math.inf, dtype=pos.dtype, device=device)
    t2i_top1 = torch.zeros(n_texts, dtype=torch.int64, device=device)

    # Counts are summed as int32 within a block (a bool sum to int64 is ~2x slower on CPU; a
    # block count is at most n_texts) and accumulated as int64.
    for start in range(0, n_images, chunk_size):
        stop = min(start + chunk_size, n_images)
        block = _as_float_tensor(sims[start:stop]).to(device)
        # Image → text: texts above the image's best caption (its other captions never are).
        i2t_ranks[start:stop] = (block > best[start:stop, None]).sum(dim=1, dtype=torch.int32)
        i2t_top1[start:stop] = block.argmax(dim=1)
        # Text → image: accumulate, over row blocks, the images that beat the text's own image.
        t2i_ranks += (block > pos[None, :]).sum(dim=0, dtype=torch.int32)
        values = _update_column_top1(block, start, col_best, t2i_top1)
        # amax propagates NaN, so this catches a NaN anywhere in the block without another pass.
        if torch.isnan(values).any():
            raise ValueError(f"sims: contains NaN scores (in rows {start}..{stop - 1})")

    return RankDetails(
        i2t_ranks=i2t_ranks.cpu().numpy(),
        i2t_top1=i2t_top1.cpu().numpy(),
        t2i_ranks=t2i_ranks.cpu().numpy(),
        t2i_top1=t2i_top1.cpu().numpy(),
    )


def retrieval_metrics(
    sims: Any, text_to_image: Any, chunk_size: int = DEFAULT_SIMS_CHUNK
) -> dict[str, float]:
    """Recall@1/5/10, medr, meanr in both directions and RSUM of a similarity matrix.

    This is the stable public entry point. Keys: ``i2t_r1 i2t_r5 i2t_r10 i2t_medr i2t_meanr
    t2i_r1 t2i_r5 t2i_r10 t2i_medr t2i_meanr rsum`` (python floats, recalls in percent).

    Args:
        sims: (n_images, n_texts) scores, numpy array or torch tensor; higher is better.
        text_to_image: (n_texts,) integer image index of each text; any number of texts per
            image (at least one).
        chunk_size: image rows scored per block (bounds the extra memory).
    """
    return rank_details(sims, text_to_image, chunk_size).metrics()


# ---------------------------------------------------------------------------------------------
# Fast path 2: only embeddings are given; the full matrix is never built
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def rank_details_from_embeddings(
    image_emb: Any,
    text_emb: Any,
    text_to_image: Any,
    chunk_size: int = DEFAULT_EMB_CHUNK,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> RankDetails:
    """Per-query ranks and top-1 indices with scores ``image_emb @ text_emb.T``, block by block.

    Each (chunk × chunk) block of scores is computed once and used for both directions: the
    block's row/column maxima update the top-1 indices, then its positive pairs are dropped and
    the scores above each query's positive score are counted. The positive scores themselves
    are computed beforehand as row-wise dot products; they can differ from the block's matrix
    product in the last bits, so the positive pairs are excluded from the counts explicitly
    (a query never counts its own captions or image) and only genuine near-ties (within float
    rounding) with other items may be counted differently from an exact evaluation.

    Args:
        image_emb: (n_images, d) image embeddings (numpy or torch).
        text_emb: (n_texts, d) text embeddings.
        text_to_image: (n_texts,) integer image index of each text.
        chunk_size: side of a score block; memory is about chunk_size² × 6 bytes.
        device: where to compute; default the image embeddings' device (CPU for numpy).
        progress: show a progress bar over the score blocks (tqdm; for runs of many minutes).
    """
    n_images, d_img = _shape_of(image_emb, "image_emb")
    n_texts, d_txt = _shape_of(text_emb, "text_emb")
    if d_img != d_txt:
        raise ValueError(
            f"text_emb: has dimension {d_txt} but image_emb has dimension {d_img}"
        )
    chunk_size = _check_chunk_size(chunk_size)
    t2i_np = _check_text_to_image(text_to_image, n_images, n_texts)
    if device is None:
        device = image_emb.device if isinstance(image_emb, torch.Tensor) else torch.device("cpu")
    img = _as_float_tensor(image_emb)
    txt = _as_float_tensor(text_emb)
    dtype = torch.promote_types(img.dtype, txt.dtype)
    img, txt = img.to(device=device, dtype=dtype), txt.to(device=device, dtype=dtype)
    for name, t in (("image_emb", img), ("text_emb", txt)):
        if torch.isnan(t).any():
            raise ValueError(f"{name}: contains NaN values")
    t2i = torch.from_numpy(t2i_np).to(img.device)

    # Positive score of each text with its own image, and each image's best caption score.
    pos = torch.empty(n_texts, dtype=dtype, device=img.device)
    for p in range(0, n_texts, chunk_size):
        q = min(p + chunk_size, n_texts)
        pos[p:q] = (img[t2i[p:q]] * txt[p:q]).sum(dim=1)
    best = torch.full((n_images,), -math.inf, dtype=dtype, device=img.device)
    best.scatter_reduce_(0, t2i, pos, reduce="amax")

    i2t_ranks = torch.zeros(n_images, dtype=torch.int64, device=img.device)
    t2i_ranks = torch.zeros(n_texts, dtype=torch.int64, device=img.device)
    row_best = torch.full((n_images,), -math.inf, dtype=dtype, device=img.device)
    i2t_top1 = torch.zeros(n_images, dtype=torch.int64, device=img.device)
    col_best = torch.full((n_texts,), -math.inf, dtype=dtype, device=img.device)
    t2i_top1 = torch.zeros(n_texts, dtype=torch.int64, device=img.device)

    bar = None
    if progress:
        from tqdm.auto import tqdm  # imported here: the module itself needs only numpy and torch

        bar = tqdm(total=n_images * n_texts, desc="ranking", unit="pair", unit_scale=True)
    for a in range(0, n_images, chunk_size):
        b = min(a + chunk_size, n_images)
        for p in range(0, n_texts, chunk_size):
            q = min(p + chunk_size, n_texts)
            block = img[a:b] @ txt[p:q].T  # (b - a, q - p)

            # Top-1 bookkeeping on the raw scores; strict ">" keeps the earliest block on ties.
            values, where = block.max(dim=1)
            better = values > row_best[a:b]
            row_best[a:b] = torch.where(better, values, row_best[a:b])
            i2t_top1[a:b] = torch.where(better, where + p, i2t_top1[a:b])
            _update_column_top1(block, a, col_best[p:q], t2i_top1[p:q])

            # Drop the positive pairs of this block: texts p..q-1 whose image is in a..b-1.
            owner = t2i[p:q]
            inside = ((owner >= a) & (owner < b)).nonzero().squeeze(1)
            block[owner[inside] - a, inside] = -math.inf

            i2t_ranks[a:b] += (block > best[a:b, None]).sum(dim=1, dtype=torch.int32)
            t2i_ranks[p:q] += (block > pos[None, p:q]).sum(dim=0, dtype=torch.int32)
            if bar is not None:
                bar.update((b - a) * (q - p))
    if bar is not None:
        bar.close()

    return RankDetails(
        i2t_ranks=i2t_ranks.cpu().numpy(),
        i2t_top1=i2t_top1.cpu().numpy(),
        t2i_ranks=t2i_ranks.cpu().numpy(),
        t2i_top1=t2i_top1.cpu().numpy(),
    )


def retrieval_metrics_from_embeddings(
    image_emb: Any,
    text_emb: Any,
    text_to_image: Any,
    chunk_size: int = DEFAULT_EMB_CHUNK,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """:func:`retrieval_metrics` of ``image_emb @ text_emb.T`` without building that matrix.

    Args:
        image_emb: (n_images, d) image embeddings (l2-normalised for cosine scores).
        text_emb: (n_texts, d) text embeddings.
        text_to_image: (n_texts,) integer image index of each text.
        chunk_size: side of a score block (memory ≈ chunk_size² × 6 bytes).
        device: where to compute; default the image embeddings' device.
        progress: show a progress bar over the score blocks.
    """
    return rank_details_from_embeddings(
        image_emb, text_emb, text_to_image, chunk_size=chunk_size, device=device, progress=progress
    ).metrics()


# ---------------------------------------------------------------------------------------------
# The slow, obviously-right oracle: sort every query's scores
# ---------------------------------------------------------------------------------------------


def rank_details_reference(sims: Any, text_to_image: Any) -> RankDetails:
    """Per-query argsort evaluation, the way the community's scripts do it (slow; for tests).

    Ties are broken by a stable sort (the lower index ranks first), so on tied scores this
    can differ from :func:`rank_details`, which counts ties in the query's favour.

    Args:
        sims: (n_images, n_texts) scores.
        text_to_image: (n_texts,) integer image index of each text.
    """
    n_images, n_texts = _shape_of(sims, "sims")
    t2i = _check_text_to_image(text_to_image, n_images, n_texts)
    s = sims.detach().cpu().numpy() if isinstance(sims, torch.Tensor) else np.asarray(sims)
    captions_of: list[list[int]] = [[] for _ in range(n_images)]
    for j, i in enumerate(t2i):
        captions_of[i].append(j)

    i2t_ranks = np.empty(n_images, dtype=np.int64)
    i2t_top1 = np.empty(n_images, dtype=np.int64)
    for i in range(n_images):
        order = np.argsort(-s[i], kind="stable")  # best text first
        i2t_top1[i] = order[0]
        i2t_ranks[i] = min(int(np.flatnonzero(order == j)[0]) for j in captions_of[i])

    t2i_ranks = np.empty(n_texts, dtype=np.int64)
    t2i_top1 = np.empty(n_texts, dtype=np.int64)
    for j in range(n_texts):
        order = np.argsort(-s[:, j], kind="stable")  # best image first
        t2i_top1[j] = order[0]
        t2i_ranks[j] = int(np.flatnonzero(order == t2i[j])[0])

    return RankDetails(i2t_ranks, i2t_top1, t2i_ranks, t2i_top1)


def retrieval_metrics_reference(sims: Any, text_to_image: Any) -> dict[str, float]:
    """:func:`retrieval_metrics` computed by :func:`rank_details_reference` (slow oracle)."""
    return rank_details_reference(sims, text_to_image).metrics()


# ---------------------------------------------------------------------------------------------
# Protocols: one table, COCO 1K (5 folds) and 5K, or any n equal folds
# ---------------------------------------------------------------------------------------------

_COCO_TEST_IMAGES = 5000


def _parse_protocol(protocol: str | None, folds: int | None, n_images: int) -> int:
    """Number of equal image folds the protocol asks for (1 = one table over everything)."""
    if folds is not None:
        if protocol not in (None, "all"):
            raise ValueError(
                f"protocol: give either protocol={protocol!r} or folds={folds!r}, not both"
            )
        n_folds = folds
    else:
        name = (protocol or "all").strip().lower()
        match = re.fullmatch(r"folds\s*=\s*(\d+)", name)
        if name == "all":
            return 1
        if name in ("coco1k", "coco5k"):
            if n_images != _COCO_TEST_IMAGES:
                raise ValueError(
                    f"protocol: {name!r} needs the {_COCO_TEST_IMAGES} COCO test images, "
                    f"got {n_images} images"
                )
            return 5 if name == "coco1k" else 1
        if match is None:
            raise ValueError(
                f"protocol: unknown protocol {protocol!r}; "
                "expected 'all', 'coco1k', 'coco5k' or 'folds=N'"
            )
        n_folds = int(match.group(1))
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 1:
        raise ValueError(f"folds: expected a positive integer, got {n_folds!r}")
    if n_images % n_folds:
        raise ValueError(
            f"folds: {n_images} images cannot be split into {n_folds} equal folds"
        )
    return int(n_folds)


def _fold_texts(t2i: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the texts whose image lies in [start, stop), and their fold-local images."""
    texts = np.flatnonzero((t2i >= start) & (t2i < stop))
    return texts, t2i[texts] - start


def _take_rows(x: Any, rows: np.ndarray) -> Any:
    if isinstance(x, torch.Tensor):
        return x[torch.from_numpy(rows).to(x.device)]
    return x[rows]


def _average(tables: Sequence[dict[str, float]]) -> dict[str, float]:
    # Averaging every key, rsum included, as the community's 1K numbers do.
    return {key: float(np.mean([t[key] for t in tables])) for key in METRIC_KEYS}


def evaluate_protocol(
    sims: Any,
    text_to_image: Any,
    protocol: str | None = "all",
    *,
    folds: int | None = None,
    chunk_size: int = DEFAULT_SIMS_CHUNK,
) -> dict[str, float]:
    """Metrics under an evaluation protocol, averaged over its image folds.

    Protocols: ``"all"`` (one table over every image and text), ``"coco5k"`` (one table over
    the 5,000 COCO test images), ``"coco1k"`` (five folds of 1,000 consecutive images with
    their captions; every metric, rsum included, is the mean over folds), ``"folds=N"`` or the
    ``folds=N`` keyword for any split into N equal folds of consecutive images.

    Args:
        sims: (n_images, n_texts) scores.
        text_to_image: (n_texts,) integer image index of each text.
        protocol: one of the names above.
        folds: number of equal image folds (instead of ``protocol``).
        chunk_size: image rows scored per block.
    """
    n_images, n_texts = _shape_of(sims, "sims")
    t2i = _check_text_to_image(text_to_image, n_images, n_texts)
    n_folds = _parse_protocol(protocol, folds, n_images)
    if n_folds == 1:
        return retrieval_metrics(sims, t2i, chunk_size)
    size = n_images // n_folds
    tables = []
    for f in range(n_folds):
        texts, local = _fold_texts(t2i, f * size, (f + 1) * size)
        cols = torch.from_numpy(texts).to(sims.device) if isinstance(sims, torch.Tensor) else texts
        block = sims[f * size : (f + 1) * size][:, cols]
        tables.append(retrieval_metrics(block, local, chunk_size))
    return _average(tables)


def evaluate_protocol_from_embeddings(
    image_emb: Any,
    text_emb: Any,
    text_to_image: Any,
    protocol: str | None = "all",
    *,
    folds: int | None = None,
    chunk_size: int = DEFAULT_EMB_CHUNK,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """:func:`evaluate_protocol` scoring ``image_emb @ text_emb.T`` block by block.

    Args:
        image_emb: (n_images, d) image embeddings.
        text_emb: (n_texts, d) text embeddings.
        text_to_image: (n_texts,) integer image index of each text.
        protocol: ``"all"``, ``"coco1k"``, ``"coco5k"`` or ``"folds=N"``.
        folds: number of equal image folds (instead of ``protocol``).
        chunk_size: side of a score block.
        device: where to compute; default the image embeddings' device.
    """
    n_images, _ = _shape_of(image_emb, "image_emb")
    n_texts, _ = _shape_of(text_emb, "text_emb")
    t2i = _check_text_to_image(text_to_image, n_images, n_texts)
    n_folds = _parse_protocol(protocol, folds, n_images)
    size = n_images // n_folds
    tables = []
    for f in range(n_folds):
        texts, local = _fold_texts(t2i, f * size, (f + 1) * size)
        tables.append(
            retrieval_metrics_from_embeddings(
                image_emb[f * size : (f + 1) * size], _take_rows(text_emb, texts), local,
                chunk_size=chunk_size, device=device,
            )  # fmt: skip
        )
    return tables[0] if n_folds == 1 else _average(tables)


# ---------------------------------------------------------------------------------------------
# Ensembles and printing
# ---------------------------------------------------------------------------------------------


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


def format_table(metrics: dict[str, float], items: str = "image") -> str:
    """The usual two-row table: image→text and text→image, R@1 R@5 R@10 medr meanr, then RSUM.

    Args:
        metrics: a dict with the keys of :data:`METRIC_KEYS`.
        items: what the gallery side is called in the row labels ("video" for a video model).
    """
    missing = [k for k in METRIC_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"metrics: missing key {missing[0]!r} (needs {', '.join(METRIC_KEYS)})")
    lines = [f"{'':<12}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'medr':>8}{'meanr':>8}"]
    for label, p in ((f"{items}->text", "i2t"), (f"text->{items}", "t2i")):
        cells = [metrics[f"{p}_r1"], metrics[f"{p}_r5"], metrics[f"{p}_r10"],
                 metrics[f"{p}_medr"], metrics[f"{p}_meanr"]]  # fmt: skip
        lines.append(f"{label:<12}" + "".join(f"{float(v):>8.1f}" for v in cells))
    lines.append(f"{'RSUM':<12}{float(metrics['rsum']):>8.1f}")
    return "\n".join(lines)


def round_metrics(metrics, digits: int = 6):
    """``metrics`` with every float rounded to ``digits`` decimals (nested dicts and lists too), so
    that JSON holds 67.3, not the 67.30000000000001 that 100 × a fraction can give."""
    if isinstance(metrics, float):
        return round(metrics, digits)
    if isinstance(metrics, dict):
        return {k: round_metrics(v, digits) for k, v in metrics.items()}
    if isinstance(metrics, (list, tuple)):
        return type(metrics)(round_metrics(v, digits) for v in metrics)
    return metrics
