"""Search engines: the top ``k`` gallery rows for each query vector, by dot product (the cosine of
unit vectors). Three engines share one interface, :class:`GalleryIndex` (``search(queries, k) ->
(scores, ids)``):

- :class:`ExactIndex` scans the gallery in chunks (matrix product + top-k per chunk, merged), so
  memory stays bounded whatever the gallery size. It is the reference the other engines are held to,
  and :func:`exact_search_reference` (one full product + a stable sort) is the reference for it.
- :class:`HNSWIndex` is FAISS's HNSW graph: approximate, but far faster on large galleries.
  :func:`choose_engine` picks it at ``FAISS_THRESHOLD`` items and above.
- :class:`IVFPQIndex` is FAISS's inverted file of product-quantised codes (128 bytes a row at
  d = 1024), whose candidates are re-scored exactly from the memory-mapped rows: for galleries of
  millions, where HNSW's full copy of every row no longer fits in memory.

:func:`build_engine` makes one over a gallery's rows; :func:`tune_engine` sets the search-time
settings of a loaded one. FAISS is optional (``pip install faiss-cpu``): without it every gallery
is searched exactly.
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod

import numpy as np

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
    import torch  # lazy: see vseinf.search

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
        import torch  # lazy: see vseinf.search

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
        import torch  # lazy: see vseinf.search

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
    try:  # optional: only the approximate engines need it
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
