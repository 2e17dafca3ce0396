"""Cross-modal retrieval metrics: Recall@K, median and mean rank, RSUM, and the usual protocols.

The community's definitions (VSE++, SCAN, VSE∞) are kept exactly:

* ``r`` is the 0-based rank of the first correct item for a query.
  Text → image: the rank of the text's own image among all images.
  Image → text: an image is correct at K when ANY of its captions is in the top K, so ``r`` is
  the rank of its best-ranked caption.
* ``R@K = 100 · mean(r < K)``; ``medr = floor(median r) + 1``; ``meanr = mean r + 1``;
  ``rsum`` is the sum of the six recalls.

The fast paths never sort. A rank is a count: for text j, ``r_j`` is the number of images that
rank above j's own image; for image i, ``r_i`` is the number of texts that rank above i's
best-ranked caption. Ties are broken as a stable sort breaks them: of two items with the same
score, the one with the lower index ranks first. So the counts equal, on every input, ties
included, the community's per-query argsort evaluation (VSE++, SCAN, VSE∞: sort the query's
scores, find its correct items) run with a stable sort; :func:`rank_details_reference` is that
slow evaluation, kept as the oracle for the fast one. (The community scripts call numpy's
default, unstable argsort, which leaves the order of tied scores unspecified; the results
differ only on exact ties.)

Everything works in blocks so memory stays bounded: :func:`retrieval_metrics` walks a given
similarity matrix a block of image rows at a time, and :func:`retrieval_metrics_from_embeddings`
never builds the full matrix at all (100,000 images × 500,000 texts would be 200 GB of float32),
scoring one image-chunk × text-chunk block at a time on the embeddings' device. On the CPU a
block is counted by numpy in tiles that fit the core's cache, two comparisons and two maxima per
score; ``benchmarks/ranks.py`` times it against the community's argsort evaluation.

This module imports only numpy and torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

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
# The counting kernel shared by both fast paths
# ---------------------------------------------------------------------------------------------

# A numpy tile is 64 rows × 2,040 columns (0.5 MB of float32, one core's L2): each of the few
# passes over a tile then reads it from cache. 64 rows ≤ 255 and 2,040 / 8 ≤ 255 are what the
# byte-lane counting in _count_rows/_count_cols needs.
_TILE_ROWS = 64
_TILE_COLS = 2040
# On a GPU a tile is a whole block's rows (one kernel per op); the column width bounds the
# gathers of the tie fix-ups.
_DEVICE_TILE_COLS = 8192


def _count_rows(mask: np.ndarray) -> np.ndarray:
    """True entries per row of a (rows, cols) bool array, as int64.

    Eight neighbouring columns add up in the eight bytes of one int64 lane, which is several
    times faster than numpy's bool → int sum; a byte holds at most cols / 8 ≤ 255.
    """
    if mask.shape[1] % 8 or mask.shape[1] > 8 * 255 or not mask.flags.c_contiguous:
        return np.count_nonzero(mask, axis=1).astype(np.int64)
    lanes = mask.view(np.int64).sum(axis=1)
    return lanes.view(np.uint8).reshape(-1, 8).sum(axis=1, dtype=np.int64)


def _count_cols(mask: np.ndarray) -> np.ndarray:
    """True entries per column of a (rows, cols) bool array (rows ≤ 255), as uint8."""
    if mask.shape[1] % 8 or mask.shape[0] > 255 or not mask.flags.c_contiguous:
        return np.count_nonzero(mask, axis=0)
    # Row sums of the int64 view add each column's bools in its own byte.
    return mask.view(np.int64).sum(axis=0).view(np.uint8)


class _RankCounter:
    """Ranks and top-1 indices of every query, accumulated as blocks of scores stream past.

    The tie rule is a stable sort's (see the module docstring): an item ranks above the query's
    correct item when it scores higher, or scores the same and has the lower index. So image i's
    rank counts texts with a score ``> best_i`` to the right of ``c_i`` (its first caption with
    the best score) and ``>= best_i`` to its left; text j's rank counts images ``> pos_j`` below
    its image and ``>= pos_j`` above it. ``x >= t`` is ``x > nextafter(t, -inf)``, so every
    tile needs one comparison per direction, with a per-row (per-column) threshold chosen by
    where the tile lies relative to ``c_i`` (the image). Only tiles that hold ``c_i`` (rows of
    the image) need the per-element rule: those few entries get an explicit tie count.

    Args:
        pos: (n_texts,) each text's score with its own image.
        text_to_image: (n_texts,) int64 image index of each text.
        n_images: number of images.
        device: None for the numpy kernel (CPU), else the torch device of the blocks.
    """

    def __init__(self, pos: np.ndarray, text_to_image: np.ndarray, n_images: int, device=None):
        n_texts = len(text_to_image)
        best = np.full(n_images, -np.inf, dtype=pos.dtype)
        np.maximum.at(best, text_to_image, pos)
        is_best = pos == best[text_to_image]
        first_best = np.full(n_images, n_texts, dtype=np.int64)
        np.minimum.at(first_best, text_to_image[is_best], np.flatnonzero(is_best))
        arrays = {
            "pos": pos, "pos_or_equal": np.nextafter(pos, -np.inf),
            "best": best, "best_or_equal": np.nextafter(best, -np.inf),
            "first_best": first_best, "t2i": text_to_image,
            "image_idx": np.arange(n_images), "text_idx": np.arange(n_texts),
            "i2t_ranks": np.zeros(n_images, dtype=np.int64),
            "t2i_ranks": np.zeros(n_texts, dtype=np.int64),
            "row_best": np.full(n_images, -np.inf, dtype=pos.dtype),
            "i2t_top1": np.zeros(n_images, dtype=np.int64),
            "col_best": np.full(n_texts, -np.inf, dtype=pos.dtype),
            "t2i_top1": np.zeros(n_texts, dtype=np.int64),
        }  # fmt: skip
        self.xp = np if device is None else torch
        for name, value in arrays.items():
            setattr(self, name, value if device is None else torch.from_numpy(value).to(device))

    def add_block(self, block: Any, row0: int, col0: int, exact_positives: bool, what: str) -> None:
        """Fold a block of scores (images row0…, texts col0…) into the ranks, tile by tile.

        Args:
            block: (rows, cols) scores, a numpy array (CPU kernel) or a torch tensor.
            row0, col0: the block's first image and text index.
            exact_positives: whether the block's positive pairs are bit-identical to ``pos``
                (a slice of the given matrix). If not (scores recomputed from embeddings),
                they are set to -inf after the top-1 bookkeeping, so a query never counts its
                own correct items; the block is then written to.
            what: the input to name in errors.
        """
        rows, cols = block.shape
        tile_rows = _TILE_ROWS if self.xp is np else rows
        tile_cols = _TILE_COLS if self.xp is np else _DEVICE_TILE_COLS
        for r in range(0, rows, tile_rows):
            for c in range(0, cols, tile_cols):
                tile = block[r : r + tile_rows, c : c + tile_cols]
                self._add_tile(tile, row0 + r, col0 + c, exact_positives, what)

    def _add_tile(self, tile: Any, a: int, p: int, exact_positives: bool, what: str) -> None:
        xp = self.xp
        b, q = a + tile.shape[0], p + tile.shape[1]
        numpy_kernel = xp is np

        # Top-1 on the raw scores: strict ">" keeps the earliest tile, argmax the first index.
        row_max = xp.amax(tile, 1)
        if bool(xp.isnan(row_max).any()):
            raise ValueError(f"{what}: contains NaN scores (in rows {a}..{b - 1})")
        better = xp.where(row_max > self.row_best[a:b])[0]
        if len(better):
            self.row_best[a + better] = row_max[better]
            self.i2t_top1[a + better] = tile[better].argmax(1) + p
        col_max = xp.amax(tile, 0)
        better = xp.where(col_max > self.col_best[p:q])[0]
        if len(better):
            self.col_best[p + better] = col_max[better]
            self.t2i_top1[p + better] = tile[:, better].argmax(0) + a

        # The texts of this tile whose image is among its rows: the only per-element cases.
        owners = self.t2i[p:q]
        inside = xp.where((owners >= a) & (owners < b))[0]
        if len(inside) and not exact_positives:
            tile[owners[inside] - a, inside] = -math.inf

        # Image → text: texts above the image's best caption score, ">=" left of c_i.
        first = self.first_best[a:b]
        threshold = xp.where(first >= q, self.best_or_equal[a:b], self.best[a:b])
        above = self._greater(tile, threshold[:, None])
        self.i2t_ranks[a:b] += _count_rows(above) if numpy_kernel else above.sum(1)
        straddle = xp.where((first >= p) & (first < q))[0]
        if len(straddle):  # ties left of c_i, in the tile that holds c_i
            held = tile if len(straddle) == len(tile) else tile[straddle]
            equal = held == self.best[a + straddle, None]
            n_equal = _count_rows(equal) if numpy_kernel else equal.sum(1)
            # Exact ties are rare: only rows with an equal score besides c_i itself (not in
            # the tile when positives were set to -inf) need the per-element rule.
            keep = n_equal > int(exact_positives)
            if bool(keep.any()):
                rows = straddle[keep]
                ties = equal[keep] & (self.text_idx[None, p:q] < first[rows, None])
                self.i2t_ranks[a + rows] += ties.sum(1)

        # Text → image: images above the text's own score, ">=" above its image.
        threshold = xp.where(owners >= b, self.pos_or_equal[p:q], self.pos[p:q])
        above = self._greater(tile, threshold)
        self.t2i_ranks[p:q] += _count_cols(above) if numpy_kernel else above.sum(0)
        if len(inside):  # ties above the image, in the tile that holds it
            equal = tile[:, inside] == self.pos[p + inside]
            keep = equal.sum(0) > int(exact_positives)  # as above: exact ties are rare
            if bool(keep.any()):
                cols = inside[keep]
                ties = equal[:, keep] & (self.image_idx[a:b, None] < owners[cols])
                self.t2i_ranks[p + cols] += ties.sum(0)

    def _greater(self, tile: Any, threshold: Any) -> Any:
        if self.xp is np:  # a C-ordered mask whatever the tile's layout, for the byte-lane counts
            return np.greater(tile, threshold, order="C")
        return tile > threshold

    def details(self) -> RankDetails:
        as_numpy = (lambda x: x) if self.xp is np else (lambda x: x.cpu().numpy())
        return RankDetails(
            i2t_ranks=as_numpy(self.i2t_ranks),
            i2t_top1=as_numpy(self.i2t_top1),
            t2i_ranks=as_numpy(self.t2i_ranks),
            t2i_top1=as_numpy(self.t2i_top1),
        )


def _working_dtype(dtype: Any) -> np.dtype:
    """float32 and float64 stay; other floats count exactly as float32; integers as float64."""
    name = str(dtype).replace("torch.", "")
    if name in ("float32", "float64"):
        return np.dtype(name)
    if "float" in name:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def _check_positives(pos: np.ndarray, t2i: np.ndarray, what: str) -> None:
    if np.isnan(pos).any():
        raise ValueError(f"{what}: contains NaN scores")
    bad = np.flatnonzero(pos == -np.inf)
    if bad.size:
        j = int(bad[0])
        raise ValueError(
            f"{what}: text {j}'s score with its own image {int(t2i[j])} is -inf; "
            "positive scores must be finite"
        )


# ---------------------------------------------------------------------------------------------
# Fast path 1: a similarity matrix is given
# ---------------------------------------------------------------------------------------------


def _row_block(sims: Any, start: int, stop: int, dtype: np.dtype, on_device: bool) -> Any:
    """Rows start:stop of sims in the kernel's form: a numpy array (a view when possible), or
    a tensor on the matrix's device."""
    if on_device:
        return sims[start:stop].to(getattr(torch, dtype.name))
    block = sims[start:stop]
    if isinstance(block, torch.Tensor):
        block = block.detach()
        if block.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16
            block = block.float()
        block = block.cpu().numpy()
    return np.asarray(block).astype(dtype, copy=False)  # asarray: a memory map's rows as a plain view


@torch.no_grad()
def rank_details(
    sims: Any, text_to_image: Any, chunk_size: int = DEFAULT_SIMS_CHUNK
) -> RankDetails:
    """Per-query ranks and top-1 indices of an (n_images × n_texts) similarity matrix.

    Counts instead of sorting, with a stable sort's tie rule (see the module docstring), so
    the result equals :func:`rank_details_reference` exactly. On the CPU the matrix is read in
    place (a memory map is fine) by numpy in cache-sized tiles; a CUDA tensor is counted on its
    device.

    Args:
        sims: (n_images, n_texts) scores, numpy array or torch tensor; higher is better.
        text_to_image: (n_texts,) integer image index of each text.
        chunk_size: image rows per block (a block is converted to float when it is not
            float32/float64, so this bounds the extra memory).
    """
    n_images, n_texts = _shape_of(sims, "sims")
    chunk_size = _check_chunk_size(chunk_size)
    t2i = _check_text_to_image(text_to_image, n_images, n_texts)
    dtype = _working_dtype(sims.dtype)
    on_device = isinstance(sims, torch.Tensor) and sims.device.type != "cpu"
    if isinstance(sims, torch.Tensor):
        idx = torch.from_numpy(t2i).to(sims.device)
        pos = sims[idx, torch.arange(n_texts, device=sims.device)].detach()
        pos = pos.to(getattr(torch, dtype.name)).cpu().numpy()
    else:
        pos = np.asarray(sims[t2i, np.arange(n_texts)], dtype=dtype)
    _check_positives(pos, t2i, "sims")

    counter = _RankCounter(pos, t2i, n_images, sims.device if on_device else None)
    for start in range(0, n_images, chunk_size):
        stop = min(start + chunk_size, n_images)
        block = _row_block(sims, start, stop, dtype, on_device)
        counter.add_block(block, start, 0, exact_positives=True, what="sims")
    return counter.details()


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

    Each (chunk × chunk) block of scores is computed once (a matrix product on ``device``) and
    counted for both directions. The positive scores are computed beforehand as row-wise dot
    products; they can differ from the block's matrix product in the last bits, so the
    positive pairs are excluded from the counts explicitly (a query never counts its own
    captions or image) and only genuine near-ties (within float rounding) with other items may
    be ranked differently from an evaluation of one full matrix.

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
    device = torch.device(device)
    img = _as_float_tensor(image_emb)
    txt = _as_float_tensor(text_emb)
    # At least float32: the counts compare scores exactly, and numpy has no bfloat16.
    dtype = torch.promote_types(torch.promote_types(img.dtype, txt.dtype), torch.float32)
    img, txt = img.to(device=device, dtype=dtype), txt.to(device=device, dtype=dtype)
    for name, t in (("image_emb", img), ("text_emb", txt)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: contains NaN or infinite values")
    t2i = torch.from_numpy(t2i_np).to(device)

    # Positive score of each text with its own image.
    pos = torch.empty(n_texts, dtype=dtype, device=device)
    for p in range(0, n_texts, chunk_size):
        q = min(p + chunk_size, n_texts)
        pos[p:q] = (img[t2i[p:q]] * txt[p:q]).sum(dim=1)
    pos_np = pos.cpu().numpy()
    _check_positives(pos_np, t2i_np, "image_emb @ text_emb.T")

    on_device = device.type != "cpu"
    counter = _RankCounter(pos_np, t2i_np, n_images, device if on_device else None)
    bar = None
    if progress:
        # Imported here: the module itself needs only numpy and torch.
        bar = tqdm(total=n_images * n_texts, desc="ranking", unit="pair", unit_scale=True)
    for a in range(0, n_images, chunk_size):
        b = min(a + chunk_size, n_images)
        for p in range(0, n_texts, chunk_size):
            q = min(p + chunk_size, n_texts)
            block = img[a:b] @ txt[p:q].T  # (b - a, q - p), ours to overwrite
            counter.add_block(
                block if on_device else block.numpy(), a, p,
                exact_positives=False, what="image_emb @ text_emb.T",
            )  # fmt: skip
            if bar is not None:
                bar.update((b - a) * (q - p))
    if bar is not None:
        bar.close()
    return counter.details()


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
    """Per-query argsort evaluation, the community's algorithm with a stable sort (slow; for tests).

    For each image: sort its scores, best first, and take the position of its best-ranked
    caption; for each text: the position of its image. The community's ``i2t``/``t2i`` do the
    same with ``numpy.argsort(row)[::-1]``; the stable sort of the negated row orders tied
    scores by index (lower first), which is the rule the fast paths count by.

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
# Printing
# ---------------------------------------------------------------------------------------------


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
