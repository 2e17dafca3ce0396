"""The encode journal: rows an interrupted ``vseinf encode`` of an image folder had already embedded,
saved beside the index as it goes, so that a killed run over a large gallery resumes instead of
starting over (:class:`EncodeJournal`)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .identity import same_model

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
