"""Gallery indexes: embed a folder of images or videos (or a captions file, or frame-feature files)
once, then search it by text, image or video.

An index is a directory::

    embeddings.npy   n × d float32, one unit-norm row per gallery item (row i ↔ items[i])
    gallery.json     what the rows are (paths, captions or clips), the model that made them, the engine
    faiss.index      only for the approximate engines: an HNSW graph over the same rows, or an
                     IVF-PQ index of their compressed codes
    thumb-*.jpg      image galleries: one thumbnail per image; video galleries made from video files:
                     one middle-frame thumbnail per clip

Gallery kinds (``gallery.json`` field ``kind``):

- ``images`` — a folder of image files, searched recursively;
- ``captions`` — a text file of captions;
- ``videos`` — a folder of video files (decoded with PyAV; frames sampled and embedded by
  :class:`vseinf.video.VideoEmbedder`: a video model's frame extractor + video tower, or an image
  model frame by frame), or frame-feature files (a folder of ``<id>.npy``, or an ``.h5`` file)
  embedded by a video model's tower. A folder is taken for videos when it holds video files and
  no images, for frame features when it holds neither (``--kind`` says so explicitly).

Three search engines share one interface, :class:`GalleryIndex` (``search(queries, k) -> (scores,
ids)``, scores are dot products = cosines of unit vectors):

- :class:`ExactIndex` scans the gallery in chunks (matrix product + top-k per chunk, merged), so
  memory stays bounded whatever the gallery size. It is the reference the other engines are held to,
  and :func:`exact_search_reference` (one full product + a stable sort) is the reference for it.
- :class:`HNSWIndex` is FAISS's HNSW graph: approximate, but far faster on large galleries.
  :func:`choose_engine` picks it at ``FAISS_THRESHOLD`` items and above.
- :class:`IVFPQIndex` is FAISS's inverted file of product-quantised codes (128 bytes a row at
  d = 1024), whose candidates are re-scored exactly from the memory-mapped rows: for galleries of
  millions, where HNSW's full copy of every row no longer fits in memory.

:func:`encode_gallery` builds or updates an index: only files that are new or changed (path, size,
mtime) are embedded again, removed files drop out, and files that are not readable images are
named, counted and skipped (so are video files that do not decode, and malformed feature
files). The directory is replaced atomically, so an interrupted run leaves the
previous index intact; one process at a time writes it (:class:`IndexLock`), and a folder holding
files vseinf did not write is refused rather than replaced. Loading checks ``gallery.json`` against
a schema (:func:`meta_schema`) and the embeddings file against its header.

Command-line entry points (registered in :mod:`vseinf.cli`): ``add_encode_parser``/``run_encode``
and ``add_search_parser``/``run_search``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

FORMAT_VERSION = 1
EMBEDDINGS_FILE = "embeddings.npy"
META_FILE = "gallery.json"
FAISS_FILE = "faiss.index"

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
KINDS = ("images", "captions", "videos")
# Thumbnails of video clips: small JPEGs named by a hash of the clip's path, kept flat in the index
# directory (the atomic directory swap handles plain files only). The name pattern is also what the
# web app checks before serving one, so gallery.json cannot point it at another file.
THUMB_SIZE = 256
THUMB_RE = re.compile(r"thumb-[0-9a-f]{20}\.jpg")

# Below this many items an exact scan answers a query in a few milliseconds (10^4 × 1024 floats is
# 40 MB, one pass over memory), so the approximate engine would only cost recall. Measured with
# benchmarks/index_search.py (gallery growth section).
FAISS_THRESHOLD = 20_000

# HNSW settings. M = 32 links per node and efConstruction = 200 build a graph on which efSearch = 64
# gives recall@10 ≈ 0.96 on GloVe 6B-50d (400k words, cosine; a hard case) and ≥ 0.99 on VSE
# embeddings of Flickr8k, at 15–170× the speed of the exact scan (benchmarks/index_search.py has
# the sweep: efSearch 128 buys ~0.99 on GloVe for half the speed).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 64


# IVF-PQ settings, for galleries whose float32 rows no longer fit in memory twice over (HNSW keeps its
# own copy of every row): an inverted file of NLIST ≈ 2·√n cells holds a product-quantised code of
# each row (128 bytes for d = 1024: 128 sub-vectors of 8 dims, 8 bits each), NPROBE cells are
# scanned per query, and the best RERANK candidates are re-scored exactly from the memory-mapped
# rows, so the reported scores are exact dot products. Measured in benchmarks/index_ivfpq.py.
IVF_NPROBE = 64
IVF_RERANK = 100
IVF_MIN_ITEMS = 10_000  # fewer rows cannot train 256 codewords per sub-quantizer (faiss wants ~39 each)
IVF_TRAIN_PER_LIST = 50  # k-means training rows per cell (a sample: the full gallery would take hours)
# auto: IVF-PQ once the rows alone take this much memory (≈ 2M rows of d = 1024)
IVF_AUTO_BYTES = 8 << 30


class IndexFormatError(ValueError):
    """An index directory that is missing, incomplete or does not fit the request."""


# ---------------------------------------------------------------------------------------------
# Search engines


def _as_queries(queries, dim: int) -> np.ndarray:
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries: expected n × {dim} vectors, got shape {q.shape}")
    return np.ascontiguousarray(q)


def _order_rows(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by score, descending; equal scores by id, ascending (a stable, documented order)."""
    if scores.size == 0:
        return scores, ids
    order = np.lexsort((ids, -scores), axis=-1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def exact_search_reference(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The obviously-right search: every score at once, then a stable sort. For tests and benchmarks."""
    vectors = np.asarray(vectors, dtype=np.float32)
    q = _as_queries(queries, vectors.shape[1])
    k = min(int(k), len(vectors))
    scores = q @ vectors.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, 1), ids.astype(np.int64)


def _tensor_rows(vectors: np.ndarray, start: int, stop: int):
    """Rows ``start:stop`` as a CPU tensor without a copy. Scored with torch's matmul, not numpy's:
    numpy takes a slow path for a single query row (~10× slower measured). The rows may be a
    read-only memory map; torch warns about wrapping one, but nothing here writes to it."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(vectors[start:stop])


class GalleryIndex(ABC):
    """Nearest neighbours by dot product over a fixed set of gallery vectors."""

    name: str = ""

    @property
    @abstractmethod
    def size(self) -> int: ...

    @property
    @abstractmethod
    def dim(self) -> int: ...

    @abstractmethod
    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` gallery rows for each query (n × d) → (scores n × k', ids n × k'), best first.

        ``k' = min(k, size)``. An id of -1 (score -inf) means the engine found fewer than k'.
        """

    def describe(self) -> dict:
        return {"engine": self.name}


class ExactIndex(GalleryIndex):
    """Exact top-k by a chunked scan: memory is bounded by ``budget_bytes``, not the gallery size.

    Args:
        vectors: n × d float32 gallery rows (may be a read-only memory map).
        chunk_rows: gallery rows scored per step.
        budget_bytes: upper bound on the score block (queries × chunk rows × 4 bytes) held at once.
        device: where to score (``"cpu"``, ``"cuda"``, ``"cuda:1"``…). Off the CPU the gallery is
            copied to the device once, here, and every search runs there.
    """

    name = "exact"

    def __init__(self, vectors: np.ndarray, chunk_rows: int = 65_536, budget_bytes: int = 64 << 20,
                 device: str | None = None):
        import torch

        if vectors.ndim != 2:
            raise ValueError(f"gallery vectors must be n × d, got shape {vectors.shape}")
        if vectors.dtype != np.float32:
            vectors = vectors.astype(np.float32)
        self.vectors = vectors
        self.chunk_rows = max(1, int(chunk_rows))
        self.budget_bytes = max(4096, int(budget_bytes))
        self.device = torch.device(device or "cpu")
        self._rows = None  # the gallery as a tensor on self.device (CPU: wrapped per chunk, never copied)
        if self.device.type != "cpu":
            self._rows = _tensor_rows(vectors, 0, len(vectors)).to(self.device)

    @property
    def size(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        q = _as_queries(queries, self.dim)
        k = min(int(k), self.size)
        n_q = len(q)
        scores = np.empty((n_q, max(k, 0)), dtype=np.float32)
        ids = np.empty((n_q, max(k, 0)), dtype=np.int64)
        if k <= 0 or n_q == 0:
            return scores, ids
        chunk = min(self.chunk_rows, self.size)
        q_block = max(1, self.budget_bytes // (4 * chunk))
        for qs in range(0, n_q, q_block):
            block = torch.from_numpy(q[qs:qs + q_block]).to(self.device)
            best_s = best_i = None
            for gs in range(0, self.size, chunk):
                rows = self._rows[gs:gs + chunk] if self._rows is not None else \
                    _tensor_rows(self.vectors, gs, gs + chunk)
                s = block @ rows.T
                top_s, top_i = torch.topk(s, min(k, s.shape[1]), dim=1)
                top_i += gs
                if best_s is not None:  # merge with the best so far; at most 2k candidates a row
                    cand_s, cand_i = torch.cat([best_s, top_s], 1), torch.cat([best_i, top_i], 1)
                    top_s, pos = torch.topk(cand_s, min(k, cand_s.shape[1]), dim=1)
                    top_i = torch.gather(cand_i, 1, pos)
                best_s, best_i = top_s, top_i
            scores[qs:qs + len(block)] = best_s.cpu().numpy()
            ids[qs:qs + len(block)] = best_i.cpu().numpy()
        return _order_rows(scores, ids)

    def describe(self) -> dict:
        return {"engine": self.name, "chunk_rows": self.chunk_rows}


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("the approximate index needs faiss: pip install faiss-cpu "
                          "(or pip install 'vseinf[serve]')") from None
    return faiss


def faiss_available() -> bool:
    try:
        _faiss()
    except ImportError:
        return False
    return True


def _no_results(n_queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.empty((n_queries, max(k, 0)), np.float32), np.empty((n_queries, max(k, 0)), np.int64)


class _FaissEngine(GalleryIndex):
    """What the FAISS engines share: ``self.index``, a FAISS index over every gallery row."""

    index = None

    def save(self, path: str | os.PathLike) -> None:
        _faiss().write_index(self.index, str(path))

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)


class HNSWIndex(_FaissEngine):
    """FAISS HNSW graph over the gallery rows, inner-product metric (cosine on unit vectors).

    Args:
        index: a ``faiss.IndexHNSWFlat`` (built by :meth:`build` or read by :meth:`load`).
        ef_search: candidate list size during search; larger = better recall, slower.
    """

    name = "hnsw"

    def __init__(self, index, ef_search: int = HNSW_EF_SEARCH):
        self.index = index
        self.ef_search = int(ef_search)
        # level 0 of an HNSW graph keeps 2·M links per node; the upper levels keep M
        self.m = int(index.hnsw.nb_neighbors(1))

    @classmethod
    def build(cls, vectors: np.ndarray, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION,
              ef_search: int = HNSW_EF_SEARCH) -> "HNSWIndex":
        faiss = _faiss()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index = faiss.IndexHNSWFlat(vectors.shape[1], int(m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(ef_construction)
        index.add(vectors)
        return cls(index, ef_search)

    @classmethod
    def load(cls, path: str | os.PathLike, ef_search: int = HNSW_EF_SEARCH) -> "HNSWIndex":
        return cls(_faiss().read_index(str(path)), ef_search)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        q, k = _as_queries(queries, self.dim), min(int(k), self.size)
        if k <= 0 or len(q) == 0:
            return _no_results(len(q), k)
        params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))
        scores, ids = self.index.search(q, k, params=params)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return _order_rows(scores, ids.astype(np.int64))

    def describe(self) -> dict:
        return {"engine": self.name, "M": self.m, "ef_search": self.ef_search}


def default_nlist(n_items: int) -> int:
    """IVF cells for a gallery of ``n_items``: the power of two nearest 2·√n, with ≥ 39 rows a cell."""
    target = 2.0 * np.sqrt(max(n_items, 1))
    nlist = 1 << max(0, int(round(np.log2(target))))
    while nlist > 16 and nlist * 39 > n_items:
        nlist //= 2
    return int(min(max(nlist, 16), 65_536))


def default_pq_m(dim: int) -> int:
    """Sub-quantizers for ``dim``-d rows: the most (≤ 128) that leave each at least 8 dimensions.
    On Flickr8k VSE embeddings (d = 1024, nprobe 32, 100 candidates re-ranked) 128 one-byte codes
    kept recall@10 at 0.972 of the exact search; 64 kept 0.917."""
    for m in range(min(128, dim // 8), 0, -1):
        if dim % m == 0:
            return m
    return 1


class IVFPQIndex(_FaissEngine):
    """FAISS inverted file with product-quantised codes, re-ranked exactly from the stored rows.

    Memory is the codes (``m`` bytes a row) plus the pages of ``vectors`` that re-ranking touches,
    so a gallery of tens of millions fits where an HNSW graph (a full copy of every row) does not.
    Scores are exact dot products of the candidates; only the candidate set is approximate.

    Args:
        index: a trained ``faiss.IndexIVFPQ`` holding every row (from :meth:`build` or :meth:`load`).
        vectors: the n × d float32 rows (may be a read-only memory map) for re-ranking.
        nprobe: cells scanned per query; larger = better recall, slower.
        rerank: candidates re-scored exactly per query (at least k).
    """

    name = "ivfpq"

    def __init__(self, index, vectors: np.ndarray, nprobe: int = IVF_NPROBE, rerank: int = IVF_RERANK):
        if index.ntotal != len(vectors) or index.d != vectors.shape[1]:
            raise IndexFormatError(f"IVF-PQ index of {index.ntotal} × {index.d} does not match the "
                                   f"{vectors.shape[0]} × {vectors.shape[1]} embeddings")
        self.index = index
        self.vectors = vectors
        self.nprobe = int(nprobe)
        self.rerank = int(rerank)
        faiss = _faiss()
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        if not isinstance(ivf, faiss.IndexIVFPQ):
            raise IndexFormatError(f"expected an IVF-PQ index, got {type(ivf).__name__}")
        self.nlist, self.m = int(ivf.nlist), int(ivf.pq.M)

    @classmethod
    def build(cls, vectors: np.ndarray, nlist: int | None = None, m: int | None = None,
              nprobe: int = IVF_NPROBE, rerank: int = IVF_RERANK, seed: int = 0) -> "IVFPQIndex":
        """Train the cells and codebooks on a seeded sample of ``vectors``, then add every row.

        Args:
            vectors: n × d float32 rows (unit length for cosine search).
            nlist: IVF cells (default :func:`default_nlist`).
            m: sub-quantizers, a divisor of d (default :func:`default_pq_m`).
            nprobe, rerank: search settings (see the class).
            seed: which rows train the quantizers.
        """
        faiss = _faiss()
        n, d = vectors.shape
        if n < IVF_MIN_ITEMS:
            raise ValueError(f"the ivfpq engine needs at least {IVF_MIN_ITEMS:,} items to train its "
                             f"quantizers; this gallery has {n:,} (use exact or hnsw)")
        nlist = int(nlist or default_nlist(n))
        m = int(m or default_pq_m(d))
        if d % m:
            raise ValueError(f"m: {m} sub-quantizers do not divide the dimension {d}")
        index = faiss.index_factory(d, f"IVF{nlist},PQ{m}", faiss.METRIC_INNER_PRODUCT)
        # Polysemous codes only speed up Hamming-distance filtering, which this engine does not use,
        # and their training costs 15× the rest of the build.
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
        n_train = min(n, max(IVF_TRAIN_PER_LIST * nlist, 256 * 39))
        rows = np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))
        index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))
        for start in range(0, n, 262_144):  # in slices: the rows may be a memory map
            index.add(np.ascontiguousarray(vectors[start:start + 262_144], dtype=np.float32))
        return cls(index, vectors, nprobe, rerank)

    @classmethod
    def load(cls, path: str | os.PathLike, vectors: np.ndarray, nprobe: int = IVF_NPROBE,
             rerank: int = IVF_RERANK) -> "IVFPQIndex":
        return cls(_faiss().read_index(str(path)), vectors, nprobe, rerank)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        q, k = _as_queries(queries, self.dim), min(int(k), self.size)
        if k <= 0 or len(q) == 0:
            return _no_results(len(q), k)
        n_cand = min(max(self.rerank, k), self.size)
        _, cand = self.index.search(q, n_cand, params=faiss.SearchParametersIVF(nprobe=self.nprobe))
        scores = np.full(cand.shape, -np.inf, np.float32)
        block = max(1, (32 << 20) // (4 * n_cand * self.dim))  # ≤ 32 MB of gathered rows at a time
        for qs in range(0, len(q), block):
            ids = cand[qs:qs + block]
            found = ids >= 0
            rows = np.asarray(self.vectors[np.where(found, ids, 0).ravel()], dtype=np.float32)
            exact = np.einsum("qcd,qd->qc", rows.reshape(*ids.shape, self.dim), q[qs:qs + block])
            scores[qs:qs + block] = np.where(found, exact, -np.inf)
        scores, ids = _order_rows(scores, cand.astype(np.int64))
        scores, ids = scores[:, :k], ids[:, :k]
        return scores, np.where(np.isfinite(scores), ids, -1)

    def describe(self) -> dict:
        return {"engine": self.name, "nlist": self.nlist, "m": self.m, "nprobe": self.nprobe,
                "rerank": self.rerank}


ENGINES = ("exact", "hnsw", "ivfpq")


def choose_engine(n_items: int, threshold: int = FAISS_THRESHOLD, dim: int = 1024) -> str:
    """``"exact"`` below ``threshold`` items (or without faiss); ``"hnsw"`` above it, and
    ``"ivfpq"`` once the float32 rows take ``IVF_AUTO_BYTES`` (HNSW would hold a second copy)."""
    if n_items < threshold or not faiss_available():
        return "exact"
    if n_items * dim * 4 >= IVF_AUTO_BYTES:
        return "ivfpq"
    return "hnsw"


# Search-time settings of the approximate engines: name → the engine it belongs to.
ENGINE_SETTINGS = {"ef_search": "hnsw", "nprobe": "ivfpq", "rerank": "ivfpq"}


def tune_engine(engine: GalleryIndex, **settings: int | None) -> GalleryIndex:
    """Sets search-time settings (``ef_search`` for HNSW, ``nprobe`` and ``rerank`` for IVF-PQ) on a
    loaded engine; ``None`` leaves one as saved. A setting for another engine is an error."""
    for name, value in settings.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if name not in ENGINE_SETTINGS:
            raise ValueError(f"{flag}: unknown engine setting (known: {', '.join(ENGINE_SETTINGS)})")
        if ENGINE_SETTINGS[name] != engine.name:
            raise ValueError(f"{flag} applies to the {ENGINE_SETTINGS[name]} engine; this index searches with "
                             f"{engine.name} (--engine {ENGINE_SETTINGS[name]} builds one)")
        if int(value) < 1:
            raise ValueError(f"{flag}: must be a positive integer, got {value}")
        setattr(engine, name, int(value))
    return engine


def add_engine_settings(p) -> None:
    """The ``--ef-search``, ``--nprobe`` and ``--rerank`` options of ``search`` and ``serve``."""
    from .argtypes import positive_int

    p.add_argument("--ef-search", type=positive_int,
                   help=f"HNSW: candidate list per query (default {HNSW_EF_SEARCH}; larger = better recall, slower)")
    p.add_argument("--nprobe", type=positive_int, help=f"IVF-PQ: cells scanned per query (default {IVF_NPROBE})")
    p.add_argument("--rerank", type=positive_int, help=f"IVF-PQ: candidates re-scored exactly (default {IVF_RERANK})")


def engine_settings(args) -> dict:
    return {name: getattr(args, name, None) for name in ENGINE_SETTINGS}


def build_engine(vectors: np.ndarray, engine: str = "auto") -> GalleryIndex:
    """An engine over ``vectors``: ``"exact"``, ``"hnsw"``, ``"ivfpq"`` or ``"auto"`` (by size)."""
    if engine == "auto":
        engine = choose_engine(len(vectors), dim=vectors.shape[1])
    if engine == "exact":
        return ExactIndex(vectors)
    if engine in ("hnsw", "faiss"):
        return HNSWIndex.build(vectors)
    if engine == "ivfpq":
        return IVFPQIndex.build(vectors)
    raise ValueError(f"engine: expected 'auto', 'exact', 'hnsw' or 'ivfpq', got {engine!r}")


# ---------------------------------------------------------------------------------------------
# Which model made the embeddings


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_identity(model) -> dict:
    """What makes two models' embeddings comparable: config hash + weights hash (+ where it came from)."""
    from .model import BUNDLED_DIR

    ckpt = getattr(model, "checkpoint_path", None)
    config = None
    if ckpt is not None and (Path(ckpt) / "config.json").is_file():
        # The model section as the checkpoint stores it, not as this version of vseinf parses it:
        # a field added to ModelConfig later (with a default) must not make old indexes unusable.
        try:
            config = json.loads((Path(ckpt) / "config.json").read_text()).get("model")
        except (OSError, ValueError, AttributeError):
            config = None
    if not isinstance(config, dict):
        config = dataclasses.asdict(model.config)
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    weights_file = Path(ckpt) / "model.safetensors" if ckpt is not None else None
    if weights_file is not None and weights_file.is_file():
        weights_hash = _sha256_file(weights_file)[:16]
    else:  # a model built in memory: hash its tensors
        h = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        weights_hash = h.hexdigest()[:16]
    bundled = ckpt is not None and Path(ckpt).resolve() == BUNDLED_DIR.resolve()
    return {
        "checkpoint": None if ckpt is None else str(Path(ckpt).resolve()),
        "bundled": bool(bundled),
        "config_hash": config_hash,
        "weights_hash": weights_hash,
        "embed_dim": int(model.config.embed_dim),
    }


def same_model(a: dict | None, b: dict | None) -> bool:
    return bool(a and b) and a.get("config_hash") == b.get("config_hash") and \
        a.get("weights_hash") == b.get("weights_hash")


# ---------------------------------------------------------------------------------------------
# Reading the gallery: image folders and captions files


@dataclass
class Skipped:
    """A gallery file that was not indexed, and why."""

    path: str
    reason: str


def scan_images(root: str | os.PathLike, exclude: Sequence[str | os.PathLike] = ()) -> tuple[list[str], list[Skipped]]:
    """Image files under ``root`` (recursive; relative POSIX paths, sorted) + files skipped by name.

    Hidden files and folders (``.name``) are ignored silently; other files without an image
    extension are reported as skipped, and so are links to files outside ``root`` (the web app
    serves only files inside the gallery). Folders in ``exclude`` (e.g. the index) are not entered.
    """
    return _scan_files(root, exclude, IMAGE_EXTENSIONS, "an image")


def scan_videos(root: str | os.PathLike, exclude: Sequence[str | os.PathLike] = ()) -> tuple[list[str], list[Skipped]]:
    """Video files under ``root`` (by extension, see :data:`vseinf.video.VIDEO_SUFFIXES`); as :func:`scan_images`."""
    from .video import VIDEO_SUFFIXES

    return _scan_files(root, exclude, frozenset(VIDEO_SUFFIXES), "a video")


def _resolved(path: Path) -> Path | None:
    """``path.resolve()``, or None for a link that cannot be followed (a loop)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: Python < 3.13's "Symlink loop"
        return None


def _scan_files(root: str | os.PathLike, exclude: Sequence[str | os.PathLike], extensions: frozenset,
                what: str) -> tuple[list[str], list[Skipped]]:
    root = Path(root).resolve()
    excluded = {Path(e).resolve() for e in exclude}
    images: list[str] = []
    skipped: list[Skipped] = []

    def unreadable(exc: OSError) -> None:  # a folder os.walk cannot list
        rel = Path(exc.filename).relative_to(root).as_posix() if exc.filename else "?"
        skipped.append(Skipped(f"{rel}/", f"cannot read the folder ({exc.strerror})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and _resolved(here / d) not in excluded)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            rel = (here / name).relative_to(root).as_posix()
            suffix = Path(name).suffix.lower()
            target = _resolved(here / name) if (here / name).is_symlink() else here / name
            if target is None:
                skipped.append(Skipped(rel, "a symbolic link loop (the link leads back to itself)"))
            elif not target.is_relative_to(root):
                skipped.append(Skipped(rel, "a link to a file outside the gallery"))
            elif suffix in extensions:
                images.append(rel)
            else:
                skipped.append(Skipped(rel, f"not {what} file (extension {suffix or 'none'!r})"))
    images.sort()
    return images, skipped


def detect_gallery_kind(gallery: str | os.PathLike, exclude: Sequence[str | os.PathLike] = ()) -> str:
    """What ``vseinf encode`` makes of a path: ``"images"``, ``"videos"``, ``"features"`` or ``"captions"``.

    A folder holding image files is an image gallery (as always: stray videos in it are skipped by
    name); one holding video files and no images is a video gallery; one holding neither, but
    frame features (``<id>.npy`` files, an ``.h5`` file or a ``features/`` folder of them), is a
    feature gallery. A file is a captions file, or frame features when it is ``.h5``/``.hdf5``.
    """
    from .video import VIDEO_SUFFIXES

    path = Path(gallery)
    if not path.is_dir():
        return "features" if path.suffix.lower() in (".h5", ".hdf5", ".hdf") else "captions"
    excluded = {Path(e).resolve() for e in exclude}
    has_video = False
    for dirpath, dirnames, filenames in os.walk(path):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and _resolved(here / d) not in excluded]
        for name in filenames:
            suffix = Path(name).suffix.lower()
            if name.startswith("."):
                continue
            if suffix in IMAGE_EXTENSIONS:
                return "images"
            has_video = has_video or suffix in VIDEO_SUFFIXES
    if has_video:
        return "videos"
    from .data.video import find_frame_features

    try:
        if find_frame_features(path) is not None:
            return "features"
    except ValueError:  # several .h5 files: let the feature reader say which to name
        return "features"
    return "images"


@dataclass
class CaptionItem:
    caption: str
    path: str  # the image the caption describes when the file says so, else "<file>:<line>"
    line: int


def read_captions_file(path: str | os.PathLike) -> list[CaptionItem]:
    """Captions for a text gallery: one per line, or ``image<TAB>caption`` (Flickr ``image#n<TAB>…`` too).

    Blank lines are ignored. Raises ValueError naming the file and line of undecodable text.
    """
    path = Path(path)
    items: list[CaptionItem] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text ({exc.reason})") from None
            if not line.strip():
                continue
            if "\t" in line:
                source, caption = line.split("\t", 1)
                source = source.strip()
                if "#" in source and source.rsplit("#", 1)[1].isdigit():
                    source = source.rsplit("#", 1)[0]  # Flickr: image.jpg#2
            else:
                source, caption = "", line
            caption = caption.strip()
            if not caption:
                continue
            items.append(CaptionItem(caption, source or f"{path.name}:{lineno}", lineno))
    return items


# ---------------------------------------------------------------------------------------------
# Encoding


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    unit = {"images": "img", "videos": "clip"}.get(desc, "caption")
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)


class _DecodedBatches:
    """Item k = batch k of ``paths`` decoded and resized: (pixels | None, kept indices, skipped as
    (index, reason)), read ahead by :func:`vseinf.data.images.image_batch_loader`. Unlike
    :class:`vseinf.data.images.ImageBatches` it keeps each unreadable file's reason for the report."""

    def __init__(self, paths: Sequence[str | os.PathLike], transform, batch_size: int):
        self.paths, self.transform, self.batch_size = list(paths), transform, batch_size

    def __len__(self) -> int:
        return (len(self.paths) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, k: int):
        import torch

        from .data.images import BadImageError, load_rgb

        pixels, kept, skipped = [], [], []
        for i in range(k * self.batch_size, min((k + 1) * self.batch_size, len(self.paths))):
            try:
                pixels.append(self.transform(load_rgb(self.paths[i])))
                kept.append(i)
            except BadImageError as exc:
                skipped.append((i, exc.reason))
        return (torch.stack(pixels) if pixels else None), kept, skipped


def default_workers(n_images: int, batch_size: int, device) -> int:
    """Decoding processes for ``encode``: on a GPU, where decoding is the bottleneck, up to 4
    (leaving a core to feed the GPU); none on a CPU, where the model costs ~15× the decoding and
    workers only compete for its cores (benchmarks/live_images.py), nor for a few batches."""
    import torch

    if n_images <= 4 * batch_size or torch.device(device).type == "cpu":
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


class _ReadAhead:
    """The batches of a :class:`_DecodedBatches` in order, each next one decoded by a thread while
    the caller embeds the current one.

    Besides the overlap, this keeps the per-image tensor work (a few small ops) off the thread that
    runs the model: there torch splits each op between its intra-op threads, and on a busy 2-core
    machine every split waits on a descheduled partner — decoding 64 photos cost 2.6 CPU-s that way
    against 0.1 s on a thread of its own (benchmarks/encode_speed.py measures the whole effect).
    """

    def __init__(self, batches: "_DecodedBatches"):
        from concurrent.futures import ThreadPoolExecutor

        self.batches = batches
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="vseinf-decode")

    def __iter__(self):
        n = len(self.batches)
        pending = self.pool.submit(self.batches.__getitem__, 0) if n else None
        for k in range(n):
            item = pending.result()  # an exception raised while decoding surfaces here
            if k + 1 < n:
                pending = self.pool.submit(self.batches.__getitem__, k + 1)
            yield item

    def close(self) -> None:
        """Stop reading ahead (waits for a batch being decoded, never starts another)."""
        self.pool.shutdown(wait=True, cancel_futures=True)


def encode_image_files(model, paths: Sequence[str | os.PathLike], batch_size: int = 32, progress: bool = False,
                       workers: int | None = None, on_batch=None,
                       reference: bool = False) -> tuple[np.ndarray, list[int], list[Skipped]]:
    """Embed image files, skipping unreadable ones → (m × d float32, indices of encoded paths, skipped).

    Each image is resized by the model's transform right after decoding, so a batch of large photos
    costs S×S pixels each, not their full size. The images go through the tower's inference copy
    (:meth:`~vseinf.encoders.image.GridImageEncoder.for_inference`: BatchNorm folded, channels-last),
    which gives ``model.encode_images``' vectors up to float rounding, while a thread decodes the
    next batch (:class:`_ReadAhead`). ``workers`` processes decode ahead instead (None: see
    :func:`default_workers`). ``reference=True`` is the plain path the fast one is held to: the
    model's own tower, images decoded here between batches. ``on_batch(embeddings, kept
    indices)`` is called after every batch (e.g. to save progress).
    """
    import torch

    from .data.images import image_batch_loader

    batches = _DecodedBatches(paths, model.image_transform(train=False), batch_size)
    fast = not reference and hasattr(model.image, "for_inference")
    tower = model.image.for_inference() if fast else model.image
    workers = default_workers(len(paths), batch_size, model.device) if workers is None else max(0, int(workers))
    if workers == 0 and fast:
        loader = _ReadAhead(batches)
    else:
        loader = image_batch_loader(batches, workers, pin_memory=model.device.type == "cuda")
    out: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[Skipped] = []
    bar = _progress(len(paths), "images", progress)
    was_training = model.training
    model.eval()
    try:
        for pixels, batch_kept, batch_skipped in loader:
            skipped.extend(Skipped(str(paths[i]), reason) for i, reason in batch_skipped)
            if pixels is not None:
                with torch.inference_mode() if fast else torch.no_grad():
                    emb, _ = tower(pixels.to(model.device, non_blocking=True))
                out.append(emb.float().cpu().numpy())
                kept.extend(batch_kept)
                if on_batch is not None:
                    on_batch(out[-1], list(batch_kept))
            if bar is not None:
                bar.update(len(batch_kept) + len(batch_skipped))
    finally:
        if isinstance(loader, _ReadAhead):
            loader.close()
        model.train(was_training)
        if bar is not None:
            bar.close()
    dim = model.config.embed_dim
    return (np.concatenate(out) if out else np.zeros((0, dim), np.float32)), kept, skipped


def encode_texts_np(model, texts: Sequence[str], batch_size: int = 128, progress: bool = False) -> np.ndarray:
    if not texts:
        return np.zeros((0, model.config.embed_dim), np.float32)
    return model.encode_texts(list(texts), batch_size=batch_size, progress=progress).float().cpu().numpy()


@dataclass
class EncodeReport:
    """What :func:`encode_gallery` did."""

    index_dir: Path
    kind: str
    total: int = 0
    encoded: int = 0
    reused: int = 0
    removed: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    engine: str = "exact"
    seconds: float = 0.0
    note: str = ""

    def add_note(self, note: str) -> None:
        self.note = f"{self.note}\n{note}" if self.note else note

    def summary(self) -> str:
        what = {"images": "images", "captions": "captions", "videos": "clips"}.get(self.kind, self.kind)
        lines = [f"{self.index_dir}: {self.total} {what} ({self.encoded} encoded, {self.reused} unchanged, "
                 f"{self.removed} removed, {len(self.skipped)} skipped), engine {self.engine}, "
                 f"{self.seconds:.1f} s"]
        if self.note:
            lines.append(self.note)
        for s in self.skipped:
            lines.append(f"  skipped {printable(s.path)}: {printable(s.reason)}")
        return "\n".join(lines)


# What an index folder may hold: the files vseinf writes there and nothing else. Every encode replaces
# the folder whole (a fresh folder swapped in), so anything else in it would be lost: a folder that
# holds anything else is refused, and on a swap only these files are deleted from the previous one.
INDEX_FILES = frozenset({EMBEDDINGS_FILE, META_FILE, FAISS_FILE})


def is_index_file(name: str) -> bool:
    """Whether ``name`` is a file vseinf writes in an index folder (see :data:`INDEX_FILES`)."""
    return name in INDEX_FILES or THUMB_RE.fullmatch(name) is not None


def foreign_files(folder: Path) -> list[str]:
    """The entries of ``folder`` that vseinf did not write (sorted; folders end in ``/``)."""
    found = []
    with os.scandir(folder) as entries:
        for e in entries:
            if not (is_index_file(e.name) and e.is_file(follow_symlinks=False)):
                found.append(e.name + ("/" if e.is_dir(follow_symlinks=False) else ""))
    return sorted(found)


def printable(name: str) -> str:
    """A file name as text that can be printed: bytes that are not UTF-8 (kept by Python as lone
    surrogates, see :func:`os.fsdecode`) are shown as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def json_text(obj, **kwargs) -> str:
    """``json.dumps`` as text that encodes to UTF-8: non-ASCII characters as they are, unless the data
    holds names that are not UTF-8 (lone surrogates, see :func:`printable`); then every non-ASCII
    character is a ``\\uXXXX`` escape, which ``json.loads`` turns back into the same name, byte for byte."""
    text = json.dumps(obj, ensure_ascii=False, **kwargs)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, ensure_ascii=True, **kwargs)
    return text


def _check_out_dir(out: Path) -> None:
    """Refuse an ``--out`` that is not a folder or that holds files vseinf did not write there: the
    atomic swap replaces the folder whole, so they would be lost."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    foreign = foreign_files(out)
    if foreign:
        shown = ", ".join(printable(n) for n in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5
                                                                 else "")
        what = "holds" if (out / META_FILE).is_file() else "is not a vseinf index and holds"
        raise ValueError(f"{printable(str(out))}: {what} files that vseinf did not write ({shown}); an index "
                         "folder is replaced whole by every encode, so move them away or choose another --out")


def _remove_index_dir(folder: Path) -> None:
    """Delete a previous index folder: vseinf's own files, then the folder if nothing else is left in
    it (a file someone put there during the swap stays, with the folder)."""
    with os.scandir(folder) as entries:
        for e in entries:
            if is_index_file(e.name) and e.is_file(follow_symlinks=False):
                os.unlink(e.path)
    try:
        folder.rmdir()
    except OSError:
        print(f"warning: kept {folder}: it holds files that vseinf did not write", file=sys.stderr)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``), so that a reader
    never finds ``a`` missing; False where the system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without it (glibc < 2.28, musl)
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _swap_in(out: Path, new: Path) -> Path | None:
    """Put the finished index folder ``new`` in place of ``out``; returns the folder now holding the
    previous index (for :func:`_remove_index_dir`), or None if there was none.

    The previous folder moves to a fresh unique name (never a fixed ``.old``, which concurrent
    swaps would fight over), in one atomic exchange where the system allows it.
    """
    if not out.exists():
        os.rename(new, out)
        return None
    if _exchange(new, out):
        return new
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old)  # over the empty folder just made
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)  # put the previous index back
        raise
    return old


class IndexLockedError(ValueError):
    """Another process is writing this index."""


def lock_path(out: Path) -> Path:
    """The lock file of the index ``out`` (beside it, hidden: the index folder itself is replaced)."""
    return out.parent / f".{out.name}.lock"


class IndexLock:
    """One writer at a time for the index folder ``out`` (and its encode journal).

    An exclusive ``flock`` on ``.<name>.lock`` beside the index, a file that holds the writer's pid
    (for the message the next writer gets). The kernel releases the lock when its holder exits,
    however it exits (kill -9 included), so a lock file left behind is never stale: the next writer
    finds it unlocked and takes it over. Systems without ``fcntl`` (Windows) take no lock.

    Args:
        out: the index folder.
        wait: wait for the current writer to finish instead of raising :class:`IndexLockedError`.
    """

    def __init__(self, out: str | os.PathLike, wait: bool = False):
        self.out = Path(out)
        self.path = lock_path(self.out)
        self.wait = wait
        self._fd: int | None = None

    def acquire(self) -> "IndexLock":
        try:
            import fcntl
        except ImportError:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip()
                os.close(fd)
                who = f"pid {holder}" if holder.isdigit() else "another process"
                raise IndexLockedError(f"{self.out}: the index is being written by {who}; wait for it to finish "
                                       "or choose another --out") from None
            except BaseException:
                os.close(fd)
                raise
            try:  # the holder before us removes the file as it lets go: lock the file that is there now
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:  # removed while still locked, so that no one can lock this file after us
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "IndexLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _tidy_leftovers(out: Path) -> None:
    """What a writer killed mid-swap left beside the index ``out`` (called under its lock): the previous
    index put back if the folder is missing, half-written folders removed (vseinf's files only)."""
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-[a-z0-9_]{{8}}")
    leftovers = sorted((p for p in out.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir()),
                       key=lambda p: p.stat().st_mtime_ns)
    if not out.exists():
        for old in reversed(leftovers):
            if old.name.startswith(f".{out.name}.old-") and (old / META_FILE).is_file():
                os.rename(old, out)
                leftovers.remove(old)
                break
    for folder in leftovers:
        _remove_index_dir(folder)


def _write_index(out: Path, meta: dict, embeddings: np.ndarray, engine: GalleryIndex,
                 extra_files: dict[str, Path] | None = None) -> None:
    """Write the index folder atomically; ``extra_files`` (name → file) are linked or copied in.
    Writers hold the index's :class:`IndexLock`; readers see the old index or the new, never a mix."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        np.save(tmp / EMBEDDINGS_FILE, np.ascontiguousarray(embeddings, dtype=np.float32), allow_pickle=False)
        (tmp / META_FILE).write_text(json_text(meta, indent=1) + "\n", encoding="utf-8")
        if isinstance(engine, _FaissEngine):
            engine.save(tmp / FAISS_FILE)
        for name, source in (extra_files or {}).items():
            try:  # a hard link costs nothing; the old index directory is deleted after the swap
                os.link(source, tmp / name)
            except OSError:
                shutil.copy2(source, tmp / name)
        for f in tmp.iterdir():  # flush file contents before the rename makes them visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _check_out_dir(out)  # again: a file put there while this run was encoding must not be lost
        previous = _swap_in(out, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if previous is not None:
        _remove_index_dir(previous)


def _previous(out: Path, kind: str, identity: dict, root: str) -> tuple["Gallery | None", str]:
    """The index already in ``out`` if its rows can be reused (same kind, source and model)."""
    if not (out / META_FILE).is_file():
        return None, ""
    try:
        old = Gallery.load(out, engine="exact")
    except (ValueError, OSError) as exc:
        return None, f"note: the previous index in {out} is unreadable ({exc}); encoding everything"
    if old.kind != kind or old.meta.get("root") != root:
        return None, f"note: {out} indexed another gallery ({old.meta.get('root')}); encoding everything"
    if not same_model(old.meta.get("model"), identity):
        return None, f"note: {out} was encoded with another model; encoding everything"
    return old, ""


def encode_gallery(gallery: str | os.PathLike, out: str | os.PathLike, model, engine: str = "auto",
                   batch_size: int = 32, progress: bool = True, kind: str = "auto", video=None,
                   workers: int | None = None, world=None) -> EncodeReport | None:
    """Build or update the index ``out`` for ``gallery``.

    Args:
        gallery: a folder of images (searched recursively), a folder of video files (recursively),
            frame features (a folder of ``<id>.npy`` files or an ``.h5`` file), or a text file of
            captions.
        out: the index directory (created, or updated incrementally if it holds an index of the
            same gallery made with the same model).
        model: a loaded :class:`vseinf.model.VSEModel`.
        engine: ``"auto"`` (by size, see :func:`choose_engine`), ``"exact"``, ``"hnsw"`` or ``"ivfpq"``.
        batch_size: images (or feature clips) per forward pass.
        progress: show progress bars on stderr.
        kind: ``"auto"`` (see :func:`detect_gallery_kind`), ``"images"``, ``"videos"`` (video
            files), ``"features"`` (frame-feature files) or ``"captions"``.
        video: for video files, the :class:`vseinf.video.VideoEmbedder` (default:
            ``VideoEmbedder.for_model(model)``).
        workers: image folders: processes decoding ahead of the model (None: by size and cores).
        world: the :class:`vseinf.distributed.World` of a torchrun job: each process encodes a share
            of an image folder and rank 0 writes the index (the others return ``None``).
    """
    t0 = time.perf_counter()
    gallery = Path(gallery)
    out = Path(out)
    if not gallery.exists():
        raise FileNotFoundError(f"{gallery}: gallery not found (a folder of images or videos, frame "
                                "features or a captions file)")
    if kind not in ("auto", "images", "videos", "features", "captions"):
        raise ValueError(f"kind: expected auto, images, videos, features or captions, got {kind!r}")
    if kind == "auto":
        kind = detect_gallery_kind(gallery, exclude=[out])
    if world is not None and world.size > 1 and (kind != "images" or not gallery.is_dir()):
        raise ValueError(f"{gallery}: several processes (torchrun) encode folders of images only; "
                         f"encode this {kind} gallery with one process")
    lock = IndexLock(out)
    if world is not None and world.size > 1:  # rank 0 writes the index; every rank learns if it cannot
        from .distributed import together

        together(world, model.device, lock.acquire if world.main else (lambda: None), "taking the index's lock")
    else:
        lock.acquire()
    try:
        return _encode_locked(gallery, out, model, engine, batch_size, progress, kind, video, workers, world, t0)
    finally:
        lock.release()


def _encode_locked(gallery: Path, out: Path, model, engine: str, batch_size: int, progress: bool, kind: str,
                   video, workers: int | None, world, t0: float) -> EncodeReport | None:
    """:func:`encode_gallery`, once this process holds the index's :class:`IndexLock`."""
    if world is None or world.main:  # the lock holder
        _tidy_leftovers(out)
    _check_out_dir(out)
    identity = model_identity(model)
    processes = 1 if world is None else world.size
    if processes > 1:
        _encode_image_share(gallery, out, model, identity, batch_size, progress and world.main, workers, world)
        if not world.main:
            return None
    extra_files: dict[str, Path] = {}
    staging: Path | None = None
    try:
        if kind == "features":
            report, meta, emb = _encode_feature_clips(gallery, out, model, identity, batch_size, progress)
        elif not gallery.is_dir() and kind in ("images", "videos"):
            raise ValueError(f"{gallery}: is one file; give a folder of {kind}")
        elif kind == "videos":
            from .video import VideoEmbedder

            out.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.thumbs-", dir=out.parent))
            embedder = video if video is not None else VideoEmbedder.for_model(model)
            report, meta, emb, extra_files = _encode_video_folder(gallery, out, identity, embedder, staging,
                                                                  progress)
        elif gallery.is_dir():
            report, meta, emb = _encode_image_folder(gallery, out, model, identity, batch_size, progress,
                                                     workers, processes)
            from .thumbnails import make_image_thumbnails  # stored, so the server need not decode photos

            out.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.thumbs-", dir=out.parent))
            extra_files = make_image_thumbnails(Path(meta["root"]), meta["items"], out, staging, progress)
        elif gallery.suffix.lower() in IMAGE_EXTENSIONS:
            raise ValueError(f"{gallery}: is one image; give a folder of images or a captions text file")
        else:
            from .video import VIDEO_SUFFIXES

            if gallery.suffix.lower() in VIDEO_SUFFIXES:
                raise ValueError(f"{gallery}: is one video; give a folder of videos")
            report, meta, emb = _encode_captions(gallery, out, model, identity, progress)
        emb = _drop_non_finite(report, meta, emb, extra_files)
        if len(emb) == 0:
            detail = "".join(f"\n  skipped {s.path}: {s.reason}" for s in report.skipped[:20])
            what = "clips" if report.kind == "videos" else report.kind
            raise ValueError(f"{gallery}: nothing to index (no readable {what}){detail}")
        if engine == "ivfpq" and len(emb) < IVF_MIN_ITEMS:
            # Refusing now would throw away the embeddings just computed.
            report.add_note(f"note: {len(emb):,} items are too few to train IVF-PQ (it needs "
                            f"{IVF_MIN_ITEMS:,}); using the exact engine")
            engine = "exact"
        index = build_engine(emb, engine)
        meta["engine"] = index.describe()
        report.engine = index.name
        _write_index(out, meta, emb, index, extra_files)
        shutil.rmtree(journal_dir(out), ignore_errors=True)  # the progress of this (or a killed) run
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    report.seconds = time.perf_counter() - t0
    return report


def _drop_non_finite(report: EncodeReport, meta: dict, emb: np.ndarray, extra_files: dict) -> np.ndarray:
    """Leave out of the index the items whose embedding is not finite (NaN or inf: the model failed
    on them), naming them in the skip report; the next run tries them again."""
    bad = ~np.isfinite(emb).all(axis=1)
    if not bad.any():
        return emb
    for i in np.flatnonzero(bad):
        item = meta["items"][i]
        report.skipped.append(Skipped(item["path"], "its embedding is not finite (NaN or inf): the model failed "
                                                    "on it"))
        extra_files.pop(item.get("thumb"), None)
    meta["items"] = [it for it, b in zip(meta["items"], bad) if not b]
    report.skipped.sort(key=lambda s: s.path)
    meta["skipped"] = [dataclasses.asdict(s) for s in report.skipped]
    n_bad = int(bad.sum())  # new rows, as a rule: an old index's rows were checked when it was loaded
    from_new = min(n_bad, report.encoded)
    report.total, report.encoded, report.reused = (report.total - n_bad, report.encoded - from_new,
                                                   report.reused - (n_bad - from_new))
    return emb[~bad]


def _base_meta(kind: str, root: Path, identity: dict, skipped: list[Skipped]) -> dict:
    from . import __version__

    return {"format": FORMAT_VERSION, "kind": kind, "root": str(root), "model": identity,
            "embed_dim": identity["embed_dim"], "vseinf_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "skipped": [dataclasses.asdict(s) for s in skipped]}


def _reuse_plan(root: Path, paths: list[str], old_rows: dict, skipped: list) -> tuple[dict, list, dict, int]:
    """Which files of a folder gallery can keep their previous rows (same size and mtime) and which
    must be encoded. ``old_rows`` maps a relative path to ``(row, size, mtime_ns, ...)``; unreadable
    files go to ``skipped``. Returns (stats, to_encode, reused old_rows entries, number removed)."""
    stats, to_encode, reused = {}, [], {}
    for rel in paths:
        try:
            st = (root / rel).stat()
        except OSError as exc:
            skipped.append(Skipped(rel, f"cannot read ({exc.strerror})"))
            continue
        stats[rel] = (st.st_size, st.st_mtime_ns)
        prev = old_rows.get(rel)
        if prev is not None and tuple(prev[1:3]) == stats[rel]:
            reused[rel] = prev
        else:
            to_encode.append(rel)
    return stats, to_encode, reused, sum(1 for rel in old_rows if rel not in stats)


# A killed `vseinf encode` of an image folder loses at most this many images' work (about 20 s on
# 2 CPU cores, under a second on a GPU; each flush writes 4 MB at d = 1024)…
ENCODE_FLUSH_EVERY = 1024
# …or this many seconds of it, whichever comes first: on a slow machine (or with large images) 1,024
# images can take many minutes, and a kill -9 runs no handler that could save them.
ENCODE_FLUSH_SECONDS = 30.0


def journal_dir(out: Path) -> Path:
    """Where the encode journal of the index ``out`` lives (beside it, hidden)."""
    return out.parent / f".{out.name}.partial"


class EncodeJournal:
    """Rows an interrupted ``vseinf encode`` of an image folder had already embedded, so that a run
    over a large gallery that is killed loses at most the last ``flush_every`` images.

    Kept beside the index as ``.<index name>.partial/``: ``journal.json`` names the model and the
    folder; each flush adds ``rows-<unique>.npy`` (float32) and then ``rows-<unique>.json`` (each
    row's path, size and mtime), which marks the pair complete. Rows are reused only for the same
    model and folder and for files whose size and mtime are unchanged. Removed once the index is
    written. Processes encoding shares of one folder (``torchrun … vseinf encode``) add to one
    journal, and rank 0 assembles the index from it.

    Args:
        out: the index folder.
        identity: :func:`model_identity` of the encoding model.
        root: the gallery folder (resolved).
        flush_every: rows held before a flush (default :data:`ENCODE_FLUSH_EVERY`).
        flush_seconds: longest time between flushes while rows come in (default
            :data:`ENCODE_FLUSH_SECONDS`), as measured by ``clock``.
        clock: seconds, monotonic (``time.monotonic``; tests pass their own).
    """

    def __init__(self, out: Path, identity: dict, root: str, flush_every: int | None = None,
                 flush_seconds: float | None = None, clock=time.monotonic):
        self.dir = journal_dir(out)
        self.identity, self.root = identity, root
        self.flush_every = int(flush_every or ENCODE_FLUSH_EVERY)
        self.flush_seconds = float(ENCODE_FLUSH_SECONDS if flush_seconds is None else flush_seconds)
        self.clock = clock
        self._last_flush = clock()
        self._rows: list[np.ndarray] = []
        self._items: list[list] = []

    def load(self) -> dict[str, tuple[int, int, np.ndarray]]:
        """rel path → (size, mtime_ns, vector) from an earlier run of the same model on the same
        folder; anything else found there is discarded."""
        meta_file = self.dir / "journal.json"
        try:
            meta = json.loads(meta_file.read_text())
            usable = same_model(meta.get("model"), self.identity) and meta.get("root") == self.root
        except (OSError, ValueError):
            usable = False
        if not usable:
            shutil.rmtree(self.dir, ignore_errors=True)
            return {}
        found: dict[str, tuple[int, int, np.ndarray]] = {}
        for part in sorted(self.dir.glob("rows-*.json")):
            try:
                items = json.loads(part.read_text())["items"]
                rows = np.load(part.with_suffix(".npy"), allow_pickle=False)
            except (OSError, ValueError, KeyError):
                continue  # a flush cut short: its images are encoded again
            if rows.ndim != 2 or len(rows) != len(items) or rows.shape[1] != self.identity.get("embed_dim"):
                continue
            for (rel, size, mtime_ns), row in zip(items, rows):
                found[rel] = (int(size), int(mtime_ns), row)
        return found

    def recorder(self, rels: Sequence[str], stats: dict):
        """An ``on_batch`` callback for :func:`encode_image_files` over the files ``rels``."""
        return lambda rows, kept: self.add([rels[i] for i in kept], stats, rows)

    def add(self, rels: Sequence[str], stats: dict, rows: np.ndarray) -> None:
        for rel, row in zip(rels, rows):
            self._items.append([rel, *stats[rel]])
            self._rows.append(row)
        if len(self._rows) >= self.flush_every or self.clock() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        # Unique names: several processes (torchrun) may add to one journal.
        stem = self.dir / f"rows-{time.time_ns()}-{os.getpid()}-{secrets.token_hex(3)}"
        try:
            meta_file = self.dir / "journal.json"
            if not meta_file.is_file():
                tmp = self.dir / f"journal.{os.getpid()}.tmp"
                tmp.write_text(json.dumps({"model": self.identity, "root": self.root}))
                os.replace(tmp, meta_file)
            tmp = stem.with_name(stem.name + ".tmp.npy")
            np.save(tmp, np.stack(self._rows).astype(np.float32), allow_pickle=False)
            os.replace(tmp, stem.with_suffix(".npy"))
            tmp = stem.with_name(stem.name + ".tmp.json")
            tmp.write_text(json.dumps({"items": self._items}))
            os.replace(tmp, stem.with_suffix(".json"))  # the .json marks the pair complete
        except BaseException:
            for leftover in self.dir.glob(f"{stem.name}.tmp.*"):
                leftover.unlink(missing_ok=True)
            if not any(self.dir.glob("rows-*.json")):  # nothing saved yet: leave no trace
                shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self._rows, self._items = [], []
        self._last_flush = self.clock()


def _image_rows(old: "Gallery | None") -> dict:
    """The rows of a previous image index: relative path → (row, size, mtime_ns)."""
    return {} if old is None else {it["path"]: (i, it.get("size"), it.get("mtime_ns"))
                                   for i, it in enumerate(old.items)}


def _journaled(done: dict, to_encode: list[str], stats: dict) -> dict[str, np.ndarray]:
    """The rows of ``to_encode`` that the journal holds for the files as they are now."""
    return {rel: done[rel][2] for rel in to_encode if rel in done and done[rel][:2] == stats[rel]}


def _encode_image_share(gallery: Path, out: Path, model, identity: dict, batch_size: int, progress: bool,
                        workers: int | None, world) -> None:
    """One torchrun process's share of an image folder (every ``world.size``-th file still to encode),
    saved to the encode journal, where rank 0 then finds every share."""
    from .distributed import in_turns, together

    root = gallery.resolve()
    paths, skipped = scan_images(root, exclude=[out])
    old, _ = _previous(out, "images", identity, str(root))
    stats, to_encode, _, _ = _reuse_plan(root, paths, _image_rows(old), skipped)
    journal = EncodeJournal(out, identity, str(root))
    # rank 0 first: it clears a journal left by another model before anyone adds to it
    done = in_turns(world, model.device, journal.load, "reading the saved progress")
    resumed = _journaled(done, to_encode, stats)
    mine = [rel for rel in to_encode[world.rank::world.size] if rel not in resumed]

    def encode_mine() -> None:
        try:
            encode_image_files(model, [root / rel for rel in mine], batch_size, progress, workers,
                               on_batch=journal.recorder(mine, stats))
        finally:
            journal.flush()

    together(world, model.device, encode_mine, "encoding its share of the images")


def _encode_image_folder(gallery: Path, out: Path, model, identity: dict, batch_size: int, progress: bool,
                         workers: int | None = None, processes: int = 1):
    root = gallery.resolve()
    report = EncodeReport(out, "images")
    paths, skipped = scan_images(root, exclude=[out])
    old, report.note = _previous(out, "images", identity, str(root))
    stats, to_encode, reused, report.removed = _reuse_plan(root, paths, _image_rows(old), skipped)
    rows = {rel: ("old", prev[0]) for rel, prev in reused.items()}

    journal = EncodeJournal(out, identity, str(root))
    resumed = _journaled(journal.load(), to_encode, stats)
    if processes > 1:
        report.add_note(f"note: {len(resumed):,} images encoded by {processes} processes")
    elif resumed:
        report.add_note(f"note: resuming an interrupted run: {len(resumed):,} images were already encoded")
    to_encode = [rel for rel in to_encode if rel not in resumed]

    try:
        new_emb, kept, bad = encode_image_files(model, [root / rel for rel in to_encode], batch_size, progress,
                                                workers, on_batch=journal.recorder(to_encode, stats))
    finally:
        journal.flush()  # on Ctrl-C too: the rows embedded since the last flush are kept
    for j, i in enumerate(kept):
        rows[to_encode[i]] = ("new", j)
    if resumed:
        offset = len(new_emb)
        new_emb = np.concatenate([new_emb, np.stack(list(resumed.values()))])
        for j, rel in enumerate(resumed):
            rows[rel] = ("new", offset + j)
        kept = kept + [None] * len(resumed)
    for s in bad:
        skipped.append(Skipped(Path(s.path).relative_to(root).as_posix(), s.reason))

    items, vectors = [], []
    for rel in sorted(rows):
        source, r = rows[rel]
        items.append({"path": rel, "size": stats[rel][0], "mtime_ns": stats[rel][1]})
        vectors.append(old.embeddings[r] if source == "old" else new_emb[r])
    emb = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, identity["embed_dim"]), np.float32)
    report.total, report.encoded, report.reused = len(items), len(kept), len(items) - len(kept)
    skipped.sort(key=lambda s: s.path)
    report.skipped = skipped
    meta = _base_meta("images", root, identity, skipped)
    meta["items"] = items
    return report, meta, emb


def _encode_captions(path: Path, out: Path, model, identity: dict, progress: bool):
    source = path.resolve()
    report = EncodeReport(out, "captions")
    captions = read_captions_file(source)
    old, report.note = _previous(out, "captions", identity, str(source.parent))
    old_rows = {} if old is None else {it["caption"]: i for i, it in enumerate(old.items)}
    missing = sorted({c.caption for c in captions if c.caption not in old_rows})
    new_emb = encode_texts_np(model, missing, progress=progress)
    new_rows = {c: i for i, c in enumerate(missing)}
    vectors = [old.embeddings[old_rows[c.caption]] if c.caption in old_rows else new_emb[new_rows[c.caption]]
               for c in captions]
    emb = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, identity["embed_dim"]), np.float32)
    report.total, report.encoded = len(captions), len(missing)
    report.reused = sum(1 for c in captions if c.caption in old_rows)
    kept = {c.caption for c in captions}
    report.removed = sum(1 for c in old_rows if c not in kept)
    meta = _base_meta("captions", source.parent, identity, [])
    meta["source"] = str(source)
    meta["items"] = [{"caption": c.caption, "path": c.path, "line": c.line} for c in captions]
    return report, meta, emb


def thumb_name(rel: str) -> str:
    """The thumbnail file name of a clip (a hash of its gallery path: safe whatever the path holds)."""
    return f"thumb-{hashlib.sha1(rel.encode('utf-8', 'surrogatepass')).hexdigest()[:20]}.jpg"


def save_thumbnail(frame, path: Path, size: int = THUMB_SIZE) -> None:
    """``frame`` (PIL) as a JPEG no larger than ``size`` × ``size``, aspect kept."""
    im = frame.convert("RGB")
    im.thumbnail((size, size))
    im.save(path, "JPEG", quality=85)


def _decode_reason(exc: Exception, path: Path) -> str:
    msg = str(exc)
    prefix = f"{path}: "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def _encode_video_folder(gallery: Path, out: Path, identity: dict, embedder, staging: Path, progress: bool):
    """Video files → (report, meta, embeddings, thumbnails to store: name → file)."""
    from .video import VideoDecodeError

    root = gallery.resolve()
    report = EncodeReport(out, "videos")
    paths, skipped = scan_videos(root, exclude=[out, staging])
    settings = embedder.settings()
    old, report.note = _previous(out, "videos", identity, str(root))
    if old is not None and (old.meta.get("video") or {}).get("embedder") != settings:
        old, report.note = None, f"note: {out} was encoded with other frame settings; encoding everything"
    old_rows = {}
    if old is not None:
        for i, it in enumerate(old.items):
            thumb = it.get("thumb")
            # A row is reusable only with its thumbnail (one deleted by hand is made again).
            if isinstance(thumb, str) and THUMB_RE.fullmatch(thumb) and (old.path / thumb).is_file():
                old_rows[it["path"]] = (i, it.get("size"), it.get("mtime_ns"), it)

    stats, to_encode, reused, report.removed = _reuse_plan(root, paths, old_rows, skipped)
    rows = {rel: ("old", prev) for rel, prev in reused.items()}

    bar = _progress(len(to_encode), "videos", progress)
    try:
        for rel in to_encode:
            path = root / rel
            try:
                emb, frame, n_frames = embedder.embed_file(path)
            except (VideoDecodeError, OSError) as exc:
                skipped.append(Skipped(rel, _decode_reason(exc, path)))
            else:
                name = thumb_name(rel)
                save_thumbnail(frame, staging / name)
                rows[rel] = ("new", (emb, n_frames, name))
            if bar is not None:
                bar.update(1)
                if skipped:
                    bar.set_postfix(skipped=len(skipped))
    finally:
        if bar is not None:
            bar.close()

    items, vectors, thumbs = [], [], {}
    for rel in sorted(rows):
        source, row = rows[rel]
        if source == "old":
            i, _, _, it = row
            vectors.append(old.embeddings[i])
            name, n_frames = it["thumb"], it.get("frames")
            thumbs[name] = old.path / name
        else:
            emb, n_frames, name = row
            vectors.append(emb)
            thumbs[name] = staging / name
        items.append({"path": rel, "id": Path(rel).stem, "size": stats[rel][0], "mtime_ns": stats[rel][1],
                      "frames": n_frames, "thumb": name})
    emb = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, identity["embed_dim"]), np.float32)
    report.total = len(items)
    report.encoded = sum(1 for source, _ in rows.values() if source == "new")
    report.reused = len(items) - report.encoded
    skipped.sort(key=lambda s: s.path)
    report.skipped = skipped
    meta = _base_meta("videos", root, identity, skipped)
    meta["video"] = {"source": "files", "embedder": settings}
    meta["items"] = items
    return report, meta, emb, thumbs


def _encode_feature_clips(path: Path, out: Path, model, identity: dict, batch_size: int, progress: bool):
    """Frame-feature files (a folder of ``<id>.npy`` or an ``.h5`` file) → (report, meta, embeddings)."""
    from .data.video import H5Frames, find_frame_features, open_frame_features
    from .video import embed_frame_features

    if model.config.image_encoder == "grid":
        raise ValueError(f"{path}: frame-feature files need a video model (model.image_encoder: frames, "
                         f"trained on such features); this model embeds images. Encode the video files "
                         "themselves instead, or pass --model with a video checkpoint")
    if path.is_dir() and not any(path.glob("*.npy")):
        found = find_frame_features(path)  # a dataset folder: its features/ or .h5 file
        if found is not None:
            path = found
    source = open_frame_features(path)
    if source.dim != model.config.feature_dim:
        raise ValueError(f"{source.where}: {source.dim}-d frame features, but the model takes "
                         f"{model.config.feature_dim}-d (its model.feature_dim); use features made the "
                         "way its training features were")
    source_path = path.resolve()
    root = source_path if source_path.is_dir() else source_path.parent
    report = EncodeReport(out, "videos")
    old, report.note = _previous(out, "videos", identity, str(root))
    old_video = (old.meta.get("video") or {}) if old is not None else {}
    if old is not None and (old_video.get("source") != "features" or old_video.get("features") != str(source_path)):
        old, report.note = None, f"note: {out} indexed other clips; encoding everything"
    old_rows = {} if old is None else {it["path"]: (i, it.get("size"), it.get("mtime_ns"), it.get("frames"))
                                       for i, it in enumerate(old.items)}

    def stat_of(vid: str):
        f = source_path if isinstance(source, H5Frames) else source.path(vid)
        st = f.stat()
        return st.st_size, st.st_mtime_ns

    skipped: list[Skipped] = []
    stats, to_encode, rows = {}, [], {}
    for i, vid in enumerate(source.video_ids):
        if source.broken[i]:
            skipped.append(Skipped(vid, source.problems.get(vid, "malformed frame features")))
            continue
        try:
            stats[vid] = stat_of(vid)
        except OSError as exc:
            skipped.append(Skipped(vid, f"cannot read ({exc.strerror})"))
            continue
        prev = old_rows.get(vid)
        if prev is not None and prev[1:3] == stats[vid]:
            rows[vid] = ("old", prev[0], prev[3])
        else:
            to_encode.append(i)
    report.removed = sum(1 for vid in old_rows if vid not in stats)

    if to_encode:
        sub = source.subset(to_encode)
        new_emb, ok = embed_frame_features(model, sub, batch_size=max(1, batch_size), progress=progress)
        new_emb = new_emb.cpu().numpy()
        for j, vid in enumerate(sub.video_ids):
            if ok[j]:
                rows[vid] = ("new", j, int(sub.lengths[j]))
            else:
                skipped.append(Skipped(vid, sub.problems.get(vid, "malformed frame features")))
                stats.pop(vid, None)
    items, vectors = [], []
    for vid in sorted(rows):
        source_kind, r, n_frames = rows[vid]
        vectors.append(old.embeddings[r] if source_kind == "old" else new_emb[r])
        items.append({"path": vid, "id": vid, "size": stats[vid][0], "mtime_ns": stats[vid][1],
                      "frames": n_frames, "thumb": None})
    emb = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, identity["embed_dim"]), np.float32)
    report.total = len(items)
    report.encoded = sum(1 for v in rows.values() if v[0] == "new")
    report.reused = len(items) - report.encoded
    skipped.sort(key=lambda s: s.path)
    report.skipped = skipped
    meta = _base_meta("videos", root, identity, skipped)
    meta["video"] = {"source": "features", "features": str(source_path), "embedder": None}
    meta["items"] = items
    return report, meta, emb


# ---------------------------------------------------------------------------------------------
# A loaded index


class _Replaced(Exception):
    """The index folder was replaced by a new one while it was being read."""


def _file_id(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


# Embeddings files up to this size are read into memory when an index is loaded, so that nothing done
# to the file afterwards can disturb a loaded index; larger ones are memory-mapped (the gallery need
# not fit in memory), and a server checks them before every query (see Gallery.check_files).
EMBEDDINGS_IN_MEMORY_BYTES = 1 << 30


def read_rows(fh, where: str | os.PathLike) -> np.ndarray:
    """The ``n × d`` float32 rows of an open ``.npy`` file, its length checked against its header first.

    A memory map of a file shorter than its header says would crash the process (SIGBUS) at the
    first missing page; here it is an :class:`IndexFormatError`. Rows up to
    :data:`EMBEDDINGS_IN_MEMORY_BYTES` are read into memory, larger files are memory-mapped.

    Args:
        fh: the file, opened for binary reading at its start.
        where: its path, for messages.
    """
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except ValueError as exc:
        raise IndexFormatError(f"{where}: cannot read embeddings (not a .npy file: {exc}); re-run `vseinf encode` "
                               "to rebuild the index") from None
    if len(shape) != 2 or dtype != np.dtype("<f4") or fortran:
        raise IndexFormatError(f"{where}: expected n × d float32 rows, got {dtype} {shape}")
    offset = fh.tell()
    expected = offset + 4 * shape[0] * shape[1]
    size = os.fstat(fh.fileno()).st_size
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise IndexFormatError(f"{where}: {state} ({size:,} bytes; {shape[0]} × {shape[1]} float32 rows take "
                               f"{expected:,}); re-run `vseinf encode` to rebuild the index")
    if expected - offset > EMBEDDINGS_IN_MEMORY_BYTES:
        return np.memmap(fh, dtype=np.float32, mode="r", offset=offset, shape=shape)
    rows = np.fromfile(fh, dtype=np.float32, count=shape[0] * shape[1])
    if rows.size != shape[0] * shape[1]:
        raise IndexFormatError(f"{where}: truncated while it was read")
    return rows.reshape(shape)


def _read_faiss(fh, where: Path):
    """A FAISS index from an open file (Linux: read in place through /proc; elsewhere from its bytes)."""
    faiss = _faiss()
    try:
        fd_path = f"/proc/self/fd/{fh.fileno()}"
        if os.path.exists(fd_path):
            return faiss.read_index(fd_path)
        return faiss.deserialize_index(np.frombuffer(fh.read(), dtype=np.uint8))
    except RuntimeError as exc:  # FAISS reports a damaged file as RuntimeError
        raise IndexFormatError(f"{where}: cannot read the FAISS index ({str(exc).splitlines()[0]})") from None


@functools.lru_cache(maxsize=1)
def meta_schema():
    """The pydantic model ``gallery.json`` is checked against when an index is opened.

    Built on first use: the other commands need not pay for importing pydantic. Fields a later
    version of vseinf adds are allowed (an index stays readable); the ones read here must have
    the right types.
    """
    from typing import Literal, Optional

    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

    class Open(BaseModel):
        model_config = ConfigDict(extra="allow")

    positive = Field(None, gt=0)

    class ModelInfo(Open):
        checkpoint: Optional[StrictStr] = None
        bundled: StrictBool = False
        config_hash: Optional[StrictStr] = None  # without them the index matches no model: search says so
        weights_hash: Optional[StrictStr] = None
        embed_dim: Optional[StrictInt] = positive

    class Item(Open):
        path: StrictStr
        size: Optional[StrictInt] = Field(None, ge=0)
        mtime_ns: Optional[StrictInt] = None
        caption: Optional[StrictStr] = None
        line: Optional[StrictInt] = None
        id: Optional[StrictStr] = None
        frames: Optional[StrictInt] = None
        thumb: Optional[StrictStr] = None

    class SkippedFile(Open):
        path: StrictStr
        reason: StrictStr

    class Engine(Open):
        engine: Literal["exact", "hnsw", "ivfpq", "faiss"] = "exact"
        chunk_rows: Optional[StrictInt] = positive
        ef_search: Optional[StrictInt] = positive
        nprobe: Optional[StrictInt] = positive
        rerank: Optional[StrictInt] = positive

    class Video(Open):
        source: Literal["files", "features"]
        embedder: Optional[dict] = None
        features: Optional[StrictStr] = None

    class GalleryMeta(Open):
        format: StrictInt = Field(FORMAT_VERSION, ge=1)
        kind: Literal["images", "captions", "videos"]
        root: StrictStr
        model: ModelInfo
        items: list[Item]
        engine: Optional[Engine] = None
        video: Optional[Video] = None
        skipped: list[SkippedFile] = []
        source: Optional[StrictStr] = None

        @model_validator(mode="after")
        def fields_of_the_kind(self):
            if self.kind == "videos" and self.video is None:
                raise ValueError("field 'video': a video gallery needs it")
            if self.kind == "captions":
                for i, it in enumerate(self.items):
                    if it.caption is None:
                        raise ValueError(f"field 'items.{i}.caption': a captions gallery's items need one")
            return self

    return GalleryMeta


def _non_finite_row(rows_file: Path, row: int, items: list, count: int = 1) -> IndexFormatError:
    more = f" (and {count - 1} more rows)" if count > 1 else ""
    return IndexFormatError(f"{rows_file}: row {row} ({printable(str(items[row].get('path')))}) is not finite "
                            f"(NaN or inf){more}; re-run `vseinf encode` to rebuild the index")


def _parse_meta(raw: bytes, meta_file: Path) -> dict:
    """``gallery.json``'s bytes → its dict, checked against :func:`meta_schema` (IndexFormatError, one
    line naming the first wrong field, if it does not fit)."""
    from pydantic import ValidationError

    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFormatError(f"{meta_file}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise IndexFormatError(f"{meta_file}: expected a JSON object, got {type(meta).__name__}")
    try:
        meta_schema().model_validate(meta)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        where = ".".join(str(part) for part in first["loc"])
        message = re.sub(r"valid dictionary( or instance of \w+)?", "JSON object", first["msg"])
        message = message.removeprefix("Value error, ")
        text = f"field '{where}': {message}" if where else message
        if where and not isinstance(first.get("input"), (dict, list)):  # a short wrong value: show it
            text += f" (got {json_text(first.get('input'))[:60]})"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise IndexFormatError(f"{meta_file}: {text}{more}; re-run `vseinf encode` to rebuild the index") from None
    if meta.get("format", FORMAT_VERSION) > FORMAT_VERSION:
        raise IndexFormatError(f"{meta_file}: made by a newer vseinf (index format {meta['format']}; this version "
                               f"reads {FORMAT_VERSION}); upgrade vseinf")
    return meta


class Gallery:
    """An index directory, loaded: items, embeddings (in memory; memory-mapped when large) and a search engine.

    Args:
        path: the index directory.
        meta: the parsed ``gallery.json``.
        embeddings: n × d float32 rows.
        engine: the search engine over them.
    """

    def __init__(self, path: Path, meta: dict, embeddings: np.ndarray, engine: GalleryIndex):
        self.path = path
        self.meta = meta
        self.embeddings = embeddings
        self.engine = engine
        self.items: list[dict] = meta["items"]
        self.root = Path(meta["root"])
        self._by_path = ({it["path"]: i for i, it in enumerate(self.items)}
                         if self.kind in ("images", "videos") else {})
        for i, it in enumerate(self.items if self._by_path else []):  # names that are not UTF-8, as printed
            self._by_path.setdefault(printable(it["path"]), i)
        self._video_embedder = None  # (model, VideoEmbedder), built on the first video/image query
        self._meta_id: tuple | None = None  # gallery.json as loaded (see replaced())
        self._rows_fh = None  # the open embeddings file when the rows are memory-mapped
        self._opened_with: tuple = (None, "cpu")  # Gallery.load's engine and device (see reload())

    @classmethod
    def load(cls, path: str | os.PathLike, engine: str | None = None, device: str = "cpu") -> "Gallery":
        """Read an index directory; ``engine`` overrides the saved one (``"exact"``, ``"hnsw"`` or
        ``"ivfpq"``; a FAISS engine other than the saved one is built here, from the embeddings).
        ``device``: where the exact engine scores (the gallery is copied there once); FAISS HNSW
        always searches on the CPU.

        Every file is read from the one folder opened first, so a ``vseinf encode`` swapping a new
        index in meanwhile gives the old index or the new one, never a mix of the two.
        """
        path = Path(path)
        for _ in range(10):
            try:
                gallery = cls._load(path, engine, device)
            except _Replaced:
                continue  # a writer swapped a new index in while this one was read: read that one
            gallery._opened_with = (engine, device)
            return gallery
        raise IndexFormatError(f"{path}: the index kept being replaced while it was read; try again")

    @classmethod
    def _load(cls, path: Path, engine: str | None, device: str) -> "Gallery":
        try:
            folder = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            raise IndexFormatError(f"{path}: not a vseinf index (no {META_FILE}); build one with `vseinf encode`") \
                from None

        def open_in_folder(name: str):
            try:
                return open(name, "rb", opener=lambda n, flags: os.open(n, flags, dir_fd=folder))
            except FileNotFoundError:
                try:  # gone because a writer replaced the folder and deleted the old one's files?
                    now = os.stat(path)
                except FileNotFoundError:
                    return None
                if (now.st_ino, now.st_dev) != (os.fstat(folder).st_ino, os.fstat(folder).st_dev):
                    raise _Replaced() from None
                return None

        meta_file, rows_file = path / META_FILE, path / EMBEDDINGS_FILE
        try:
            fh = open_in_folder(META_FILE)
            if fh is None:
                raise IndexFormatError(f"{path}: not a vseinf index (no {META_FILE}); build one with `vseinf encode`")
            with fh:
                raw = fh.read()
                meta_id = _file_id(os.fstat(fh.fileno()))
            meta = _parse_meta(raw, meta_file)
            fh = open_in_folder(EMBEDDINGS_FILE)
            if fh is None:
                raise IndexFormatError(f"{rows_file}: cannot read embeddings (the file is missing)")
            try:
                emb = read_rows(fh, rows_file)
            except BaseException:
                fh.close()
                raise
            if isinstance(emb, np.memmap):
                rows_fh = fh  # kept open: check_files() compares it with what was mapped
            else:
                fh.close()
                rows_fh = None
            if emb.shape[0] != len(meta["items"]):
                raise IndexFormatError(f"{rows_file}: expected {len(meta['items'])} × d float32 rows, "
                                       f"got {emb.dtype} {emb.shape}")
            if not isinstance(emb, np.memmap):  # mapped rows (larger than memory) are checked as results
                bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
                if len(bad):
                    raise _non_finite_row(rows_file, int(bad[0]), meta["items"], len(bad))
            saved_engine = meta.get("engine") or {}
            saved = saved_engine.get("engine", "exact")
            want = engine or saved
            if want == "faiss":
                want = "hnsw"
            if want not in ENGINES:
                raise ValueError(f"engine: expected one of {', '.join(ENGINES)}, got {want!r}")
            prebuilt = want == saved and want in ("hnsw", "ivfpq") and faiss_available()
            faiss_fh = open_in_folder(FAISS_FILE) if prebuilt else None
            if want == "hnsw" and faiss_fh is not None:
                with faiss_fh:
                    index: GalleryIndex = HNSWIndex(_read_faiss(faiss_fh, path / FAISS_FILE),
                                                    saved_engine.get("ef_search", HNSW_EF_SEARCH))
                if index.size != len(emb):
                    raise IndexFormatError(f"{path / FAISS_FILE}: {index.size} vectors, expected {len(emb)}")
            elif want == "ivfpq" and faiss_fh is not None:
                with faiss_fh:
                    try:
                        index = IVFPQIndex(_read_faiss(faiss_fh, path / FAISS_FILE), emb,
                                           saved_engine.get("nprobe", IVF_NPROBE),
                                           saved_engine.get("rerank", IVF_RERANK))
                    except IndexFormatError as exc:
                        raise IndexFormatError(f"{path / FAISS_FILE}: {exc}") from None
            elif want in ("hnsw", "ivfpq") and not faiss_available() and engine is None:
                # saved with a FAISS engine but faiss is gone: exact still answers correctly
                index = ExactIndex(emb, device=device)
            elif want == "hnsw":
                index = HNSWIndex.build(np.asarray(emb))
            elif want == "ivfpq":
                index = IVFPQIndex.build(emb)
            else:
                index = ExactIndex(emb, device=device)
        finally:
            os.close(folder)
        gallery = cls(path, meta, emb, index)
        gallery._meta_id = meta_id
        gallery._rows_fh = rows_fh
        gallery._rows_stat = os.fstat(rows_fh.fileno()) if rows_fh is not None else None
        return gallery

    def on_disk(self) -> tuple | None:
        """What identifies the ``gallery.json`` now in the folder (None if there is none just now)."""
        try:
            return _file_id(os.stat(self.path / META_FILE))
        except OSError:
            return None

    def replaced(self) -> bool:
        """Whether the index folder now holds another index than this one (``vseinf encode`` ran since
        it was loaded). A folder missing for a moment (a swap in progress) does not count."""
        now = self.on_disk()
        return now is not None and now != self._meta_id

    def check_files(self) -> None:
        """Raise IndexFormatError if the memory-mapped embeddings file changed since it was opened.

        Reading a memory map whose file was truncated kills the process (SIGBUS), so a long-running
        reader (the web app) calls this before searching. Rows read into memory (files up to
        :data:`EMBEDDINGS_IN_MEMORY_BYTES`) cannot be disturbed, and an index replaced by ``vseinf
        encode`` leaves the mapped file as it was: neither fails here.
        """
        if self._rows_fh is None:
            return
        now = os.fstat(self._rows_fh.fileno())
        if (now.st_size, now.st_mtime_ns) != (self._rows_stat.st_size, self._rows_stat.st_mtime_ns):
            change = "truncated" if now.st_size < self._rows_stat.st_size else "changed"
            raise IndexFormatError(f"{self.path / EMBEDDINGS_FILE}: {change} on disk while it was in use "
                                   f"({self._rows_stat.st_size:,} → {now.st_size:,} bytes)")

    def reload(self) -> "Gallery":
        """The index the folder holds now, loaded as this one was (engine, device, search settings)."""
        engine, device = self._opened_with
        new = Gallery.load(self.path, engine=engine, device=device)
        if new.engine.name == self.engine.name:  # keep the settings this engine was tuned with
            for name, owner in ENGINE_SETTINGS.items():
                if owner == new.engine.name and hasattr(self.engine, name):
                    setattr(new.engine, name, getattr(self.engine, name))
        return new

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def video_source(self) -> str | None:
        """``"files"`` or ``"features"`` for video galleries, else None."""
        return (self.meta.get("video") or {}).get("source") if self.kind == "videos" else None

    def thumb_file(self, rel: str) -> Path | None:
        """The stored thumbnail of an indexed clip, or None (not a clip here, or none stored).

        Only clips listed in the index resolve, only to a file named like a thumbnail, inside
        the index directory: nothing else on disk is reachable through it.
        """
        if self.kind != "videos" or rel not in self._by_path:
            return None
        name = self.items[self._by_path[rel]].get("thumb")
        if not isinstance(name, str) or not THUMB_RE.fullmatch(name):
            return None
        base = self.path.resolve()
        full = (base / name).resolve()
        if not full.is_relative_to(base) or not full.is_file():
            return None
        return full

    def file_path(self, rel: str) -> Path | None:
        """The file of an indexed image (or video file), or None if ``rel`` is not one of this gallery.

        Only paths listed in the index resolve, and only to files inside the gallery folder (a
        symlink pointing elsewhere does not), so a caller cannot reach anything else on disk.
        """
        if not (self.kind == "images" or self.video_source == "files") or rel not in self._by_path:
            return None
        root = self.root.resolve()
        full = (root / self.items[self._by_path[rel]]["path"]).resolve()
        if not full.is_relative_to(root) or not full.is_file():
            return None
        return full

    def search(self, queries, k: int, absolute: bool = False) -> list[list[dict]]:
        """Results for each query vector, best first.

        Images: ``{"path", "score"}``; captions: ``+ "caption"``; videos: ``{"path", "id", "kind":
        "video", "score", "thumb"}`` — ``thumb`` is the thumbnail's file name in the index
        directory (its full path when ``absolute``), or None for clips made from feature files.
        ``path`` is always relative to the gallery folder (as the web API reports it);
        ``absolute`` adds ``"file"``, the full path of the image or video file.
        """
        queries = np.asarray(queries, dtype=np.float32)
        if not np.isfinite(queries).all():
            raise ValueError("the query's embedding is not finite (NaN or inf)")
        scores, ids = self.engine.search(queries, k)
        bad = (ids >= 0) & ~np.isfinite(scores)
        if bad.any():  # a damaged row of a memory-mapped index (rows in memory are checked on loading)
            raise _non_finite_row(self.path / EMBEDDINGS_FILE, int(ids[bad][0]), self.items)
        files = self.kind == "images" or self.video_source == "files"
        out = []
        for srow, irow in zip(scores, ids):
            results = []
            for s, i in zip(srow.tolist(), irow.tolist()):
                if i < 0:
                    continue
                item = self.items[i]
                path = item["path"]
                if self.kind == "videos":
                    thumb = item.get("thumb")
                    if thumb is not None and absolute:
                        thumb = str(self.path.resolve() / thumb)
                    r = {"path": path, "id": item.get("id") or Path(item["path"]).stem, "kind": "video",
                         "score": round(float(s), 6), "thumb": thumb}
                else:
                    r = {"path": path, "score": round(float(s), 6)}
                if self.kind == "captions":
                    r["caption"] = item["caption"]
                if absolute and files:
                    r["file"] = str(self.root / path)
                results.append(r)
            out.append(results)
        return out

    def video_embedder(self, model):
        """The :class:`vseinf.video.VideoEmbedder` that embeds video (and image) queries like this gallery's clips.

        Video-file galleries rebuild the recorded one; other galleries searched with an image
        model get the default (frame by frame). A video model over a feature gallery has no
        frame extractor on record: ValueError.
        """
        from .video import VideoEmbedder

        if self._video_embedder is not None and self._video_embedder[0] is model:
            return self._video_embedder[1]
        settings = (self.meta.get("video") or {}).get("embedder")
        if settings:
            embedder = VideoEmbedder.from_settings(model, settings)
        elif model.config.image_encoder == "grid":
            embedder = VideoEmbedder(model)
        elif self.kind == "videos":
            raise ValueError("this gallery was made from frame-feature files, so the frame extractor its "
                             "video model needs is not on record: search it by text, or encode the "
                             "video files themselves")
        else:
            raise ValueError("this model embeds precomputed features, not images or video files: "
                             "search this gallery by text")
        self._video_embedder = (model, embedder)
        return embedder

    def load_model(self, model_path: str | os.PathLike | None = None, device: str = "cpu", text_only: bool = False):
        """The model that encoded this gallery (or ``model_path``, checked to be the same model);
        ``text_only``: just its text tower (see :func:`vseinf.model.load_model`)."""
        from .model import load_model

        info = self.meta["model"]
        if model_path is None:
            if info.get("bundled"):
                model = load_model(device=device, text_only=text_only)
            elif info.get("checkpoint") and Path(info["checkpoint"]).is_dir():
                model = load_model(info["checkpoint"], device=device, text_only=text_only)
            else:
                raise ValueError(f"{self.path}: the model that built this index ({info.get('checkpoint')}) is "
                                 "not there any more; pass --model CHECKPOINT")
        else:
            model = load_model(model_path, device=device, text_only=text_only)
        check_model(self, model)
        return model


def check_model(gallery: Gallery, model) -> None:
    """Raise ValueError unless ``model`` is the model whose embeddings fill ``gallery``."""
    info = gallery.meta["model"]
    mine = model_identity(model)
    if not same_model(info, mine):
        raise ValueError(f"{gallery.path}: this index was built with another model ({info.get('checkpoint')}, "
                         f"config {info.get('config_hash')}, weights {info.get('weights_hash')}); its "
                         f"embeddings are not comparable with {mine['checkpoint']}. Re-run `vseinf encode` "
                         "with this model.")


def embed_query_images(gallery: Gallery, model, images: Sequence) -> np.ndarray:
    """Image queries (PIL) → ``n × d`` float32 in the gallery's space.

    An image model embeds them as images; a video model (a video gallery) as one-frame clips,
    through the gallery's frame extractor and its video tower.
    """
    if model.config.image_encoder == "grid":
        return model.encode_images(list(images)).float().cpu().numpy()
    embedder = gallery.video_embedder(model)
    return np.stack([embedder.embed_frames([im]) for im in images]).astype(np.float32)


def embed_query_video(gallery: Gallery, model, path: str | os.PathLike) -> np.ndarray:
    """A video query → ``1 × d``: a video file (decoded like the gallery's clips) or, for a video
    model, a ``T × D`` ``.npy`` file of frame features."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: query video not found")
    if path.suffix.lower() == ".npy":
        if model.config.image_encoder == "grid":
            raise ValueError(f"{path}: frame features need a video model; this gallery's model embeds images")
        try:
            feats = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise ValueError(f"{path}: not a readable .npy array ({exc})") from None
        dim = model.config.feature_dim
        if feats.ndim != 2 or feats.shape[0] == 0 or feats.shape[1] != dim or feats.dtype.kind not in "fiu":
            raise ValueError(f"{path}: expected T × {dim} frame features, got {feats.dtype} {feats.shape}")
        feats = feats.astype(np.float32)
        if not np.isfinite(feats).all():
            raise ValueError(f"{path}: non-finite values (NaN or inf) in the frame features")
        import torch

        return model.encode_image_features([torch.from_numpy(feats)]).float().cpu().numpy()
    return gallery.video_embedder(model).embed_file(path)[0][None, :]


def load_query_image(data: bytes | str | os.PathLike, max_pixels: int = 64_000_000):
    """An uploaded or named image as RGB; ValueError (BadImageError for files) if it is not a readable image."""
    import io
    import warnings

    from PIL import Image

    from .data.images import load_rgb

    if not isinstance(data, (bytes, bytearray)):
        return load_rgb(data)
    if not data:
        raise ValueError("the upload is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > max_pixels:
                    raise ValueError(f"image too large ({im.width}×{im.height} pixels)")
                im.load()
                return im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"image too large ({exc})") from None
    except Image.UnidentifiedImageError:
        raise ValueError("not a readable image (not a format PIL can decode)") from None
    except (OSError, SyntaxError, EOFError) as exc:
        raise ValueError(f"not a readable image ({exc})") from None


# ---------------------------------------------------------------------------------------------
# Command line: vseinf encode / vseinf search


def add_encode_parser(sub):
    from .argtypes import nonnegative_int, positive_int

    p = sub.add_parser("encode", help="embed a folder of images or videos (or a captions file) into a search index",
                       description="Embed a gallery into INDEX_DIR. Re-running on a grown folder encodes only "
                                   "new or changed files; removed files drop out; unreadable files are "
                                   "listed and skipped. A folder of video files gets one embedding and one "
                                   "thumbnail per clip; a folder of <id>.npy frame features (or an .h5 file) "
                                   "needs a video model.")
    p.add_argument("gallery", help="folder of images or video files (searched recursively), frame features "
                                   "(folder of <id>.npy or an .h5 file), or a captions file")
    p.add_argument("--out", required=True, help="index directory to create or update")
    p.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    p.add_argument("--engine", default="auto", choices=["auto", *ENGINES],
                   help=f"search engine (auto: HNSW from {FAISS_THRESHOLD:,} items; IVF-PQ, compressed codes "
                        "re-ranked exactly, once the rows take 8 GiB)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per model call (default 32)")
    p.add_argument("--workers", type=nonnegative_int, default=None,
                   help="processes decoding images ahead of the model (default: up to 4 on a GPU, none on a CPU)")
    p.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, cuda:1…)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and scripts)")
    g = p.add_argument_group("videos")
    g.add_argument("--kind", default="auto", choices=["auto", "images", "videos", "features"],
                   help="what the gallery folder holds (auto: images if any, else videos, else frame features)")
    g.add_argument("--frames", type=positive_int, default=None,
                   help="frames sampled per clip (default: 32 for video models, or the extraction settings'; "
                        "8 for image models, whose clip embedding is the mean of its frames')")
    g.add_argument("--extract-settings",
                   help="video models: the extract.json of the features the model was trained on "
                        "(default: the model's backbone at 224 px, as `vseinf extract` makes them)")
    g.add_argument("--backbone-weights", help="video models: the backbone weights file those settings name")
    return p


def load_model_or_explain(path: str | os.PathLike | None = None, device: str = "cpu"):
    """``vseinf.load_model`` with a message that says what to do when the bundled model is missing."""
    from .checkpoint import CheckpointError
    from .model import load_model

    try:
        return load_model(path, device=device)
    except CheckpointError as exc:
        if path is None:
            raise ValueError(f"the bundled model is not installed ({exc}); pass --model CHECKPOINT_DIR "
                             "(a directory made by `vseinf train`)") from None
        raise


def run_encode(args, extra) -> int:
    frames = getattr(args, "frames", None)
    if frames is not None and frames < 1:
        raise ValueError(f"encode: --frames must be a positive integer, got {frames}")
    from .distributed import init_distributed

    world = init_distributed()  # under torchrun: each process encodes a share of an image folder
    device = args.device
    if world.size > 1 and str(device).startswith("cuda"):
        device = f"cuda:{world.local_rank}"
    model = load_model_or_explain(args.model, device)
    kind = getattr(args, "kind", "auto")
    video = None
    video_options = frames is not None or getattr(args, "extract_settings", None) or \
        getattr(args, "backbone_weights", None)
    if video_options or kind == "videos":
        if kind == "auto":
            kind = detect_gallery_kind(args.gallery, exclude=[args.out]) if Path(args.gallery).exists() else kind
        if kind == "videos":
            from .video import VideoEmbedder

            video = VideoEmbedder.for_model(model, frames, getattr(args, "extract_settings", None),
                                            getattr(args, "backbone_weights", None))
        elif video_options:
            raise ValueError(f"encode: --frames/--extract-settings/--backbone-weights are for folders of video "
                             f"files; {args.gallery} is taken for {kind}")
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"encode: --workers must be 0 or more, got {args.workers}")
    report = encode_gallery(args.gallery, args.out, model, engine=args.engine, batch_size=args.batch_size,
                            workers=args.workers, progress=not args.no_progress, kind=kind, video=video,
                            world=world if world.size > 1 else None)
    if report is not None:  # rank 0 (or the only process)
        print(report.summary())
    return 0


def add_search_parser(sub):
    from .argtypes import positive_int

    p = sub.add_parser("search", help="search an index by text, image or video",
                       description='vseinf search INDEX "a dog runs on the beach" -k 10, or --image photo.jpg, '
                                   'or --video clip.mp4, or --queries FILE (one text query a line → JSON lines)')
    p.add_argument("index", help="index directory made by `vseinf encode`")
    p.add_argument("query", nargs="?", help="text query")
    p.add_argument("--queries", metavar="FILE",
                   help="text queries, one a line ('-': standard input); prints one JSON line per query, "
                        '{"line": N, "query": …, "results": […]}, so a script pays the start-up once')
    p.add_argument("--image", help="search with this image instead of text")
    p.add_argument("--video", help="search with this video file instead of text (or, for a video model, a "
                                   "T×D .npy file of frame features)")
    p.add_argument("-k", type=positive_int, default=10, help="number of results (default 10)")
    p.add_argument("--json", action="store_true", help='print {"results": [{"path": …, "file": …, "score": …}, '
                                                       '…]}: path relative to the gallery folder (as in '
                                                       '/api/search), file its full path (video galleries: + '
                                                       '"id", "kind", "thumb")')
    p.add_argument("--model", help="checkpoint directory (default: the model that built the index)")
    p.add_argument("--engine", choices=list(ENGINES), help="override the index's engine")
    p.add_argument("--device", default="cpu", help="where the model and the exact engine run (cpu, cuda, cuda:1…)")
    add_engine_settings(p)
    return p


def read_queries_file(path: str) -> list[tuple[int, str]]:
    """``(line number, query)`` for each non-blank line of ``path`` (``"-"``: standard input)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: queries file not found") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, not a queries file") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


# Queries embedded and searched per step of --queries: output streams, and memory stays bounded.
QUERY_CHUNK = 256


def _search_many(gallery: Gallery, model, queries: list[tuple[int, str]], k: int) -> None:
    """Print one JSON line per query, in file order, flushed after each chunk."""
    for start in range(0, len(queries), QUERY_CHUNK):
        chunk = queries[start:start + QUERY_CHUNK]
        vectors = encode_texts_np(model, [q for _, q in chunk])
        for (line, query), results in zip(chunk, gallery.search(vectors, k, absolute=True)):
            print(json_text({"line": line, "query": query, "results": results}))
        sys.stdout.flush()


def _embed_one_text(model, text: str) -> np.ndarray:
    """One text query → 1 × d, computed on one thread. A query is a few tokens: too little work to
    share between threads, and on a busy machine every op would wait for a descheduled partner
    thread (one MiniLM query took 5–8 s with 2 threads against 0.3 s with one on a loaded 2-core CPU)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return encode_texts_np(model, [text])
    finally:
        torch.set_num_threads(threads)


def run_search(args, extra) -> int:
    video_query = getattr(args, "video", None)
    queries_file = getattr(args, "queries", None)
    if sum(x is not None for x in (args.query, args.image, video_query, queries_file)) != 1:
        raise ValueError("search: give a text query or --image FILE or --video FILE or --queries FILE (one of them)")
    if args.k < 1:
        raise ValueError(f"search: -k must be a positive integer, got {args.k}")
    if args.query is not None and not args.query.strip():
        raise ValueError("search: the query is empty")
    queries = read_queries_file(queries_file) if queries_file is not None else None
    if queries is not None and not queries:
        raise ValueError(f"search: {queries_file} holds no queries")
    gallery = Gallery.load(args.index, engine=args.engine, device=args.device)
    tune_engine(gallery.engine, **engine_settings(args))
    image = load_query_image(args.image) if args.image is not None else None  # fail before loading the model
    if video_query is not None and not Path(video_query).is_file():
        raise FileNotFoundError(f"{video_query}: query video not found")
    # Text queries need only the text tower: no CNN, no transformers import (start-up is most of a query).
    text = image is None and video_query is None
    model = gallery.load_model(args.model, device=args.device, text_only=text)
    if queries is not None:
        _search_many(gallery, model, queries, args.k)
        return 0
    if image is not None:
        query = embed_query_images(gallery, model, [image])
    elif video_query is not None:
        query = embed_query_video(gallery, model, video_query)
    else:
        query = _embed_one_text(model, args.query)
    results = gallery.search(query, args.k, absolute=True)[0]
    if args.json:
        print(json_text({"results": results}))
        return 0
    for rank, r in enumerate(results, 1):
        text = f"  {r['caption']}" if "caption" in r else ""
        print(f"{rank:3d}. {r['score']:.4f}  {printable(r.get('file', r['path']))}{text}")
    return 0


__all__ = [
    "FAISS_THRESHOLD", "ENGINES", "ExactIndex", "HNSWIndex", "IVFPQIndex", "GalleryIndex", "Gallery",
    "EncodeReport", "Skipped", "build_engine", "choose_engine", "tune_engine", "encode_gallery", "encode_image_files",
    "exact_search_reference",
    "model_identity", "read_captions_file", "scan_images", "scan_videos", "detect_gallery_kind", "check_model",
    "load_query_image", "embed_query_images", "embed_query_video", "thumb_name",
    "IndexFormatError", "IndexLock", "IndexLockedError", "meta_schema", "read_rows", "printable",
    "add_encode_parser", "run_encode", "add_search_parser", "run_search", "read_queries_file",
]
