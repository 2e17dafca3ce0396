"""A disk cache of per-item feature sets (grid features, token features), fp16 and memory-mapped.

Extracting backbone features for a whole dataset takes hours; storing them lets training and
evaluation read them back in milliseconds. A cache is a folder:

- ``features.npy`` — every item's rows stacked: ``total_rows × C`` float16;
- ``offsets.npy`` — int64 ``[n_items + 1]``: item i is rows ``offsets[i]:offsets[i+1]``;
- ``meta.json`` — shapes, item keys and the caller's ``signature`` (backbone name, weights
  hash, input size, …) so that a cache built with other settings is noticed.

Items may all have the same number of rows (``set_size``, e.g. 16×16 = 256 grid cells) or
each its own (token features). Reading memory-maps ``features.npy``: only the rows asked for
are read from disk.

:class:`FeatureCacheWriter` streams items in and writes under a temporary name; only
:meth:`FeatureCacheWriter.close`, after the last item, renames the folder into place. A killed
extraction therefore never leaves a folder that :class:`FeatureCache` would accept.

A ``resumable`` writer (what ``vseinf extract`` and training use) writes into ``.<name>.partial``
beside the cache and records its progress there every ``checkpoint_every`` items; a writer
started later with the same settings continues from the last record instead of from the start.
Writers that are not resumable (or find the partial folder held by another process) use a private
``.<name>.tmp-<host>-<pid>-…`` folder, removed when they fail; ones left by a killed process of
this machine are removed by the next writer of that cache.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import struct
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = [
    "CacheError",
    "FeatureCache",
    "FeatureCacheWriter",
    "StaleCacheError",
    "cache_dir",
    "cache_path",
    "open_cache",
]

FORMAT = "vseinf-feature-cache"
VERSION = 1
_FEATURES, _OFFSETS, _META = "features.npy", "offsets.npy", "meta.json"
_PROGRESS, _LOCK = "progress.json", ".lock"
CHECKPOINT_EVERY = 1024
# The .npy header is written last, when the row count is known; this many bytes are kept free
# for it at the front of the file (a multiple of 64, as the .npy format wants data aligned).
_HEADER_BYTES = 128


class CacheError(ValueError):
    """A feature cache folder is missing, incomplete or malformed (the message names it)."""


class StaleCacheError(CacheError):
    """A cache exists but was built with a different signature (other backbone, weights, …)."""


def cache_dir() -> Path:
    """The root folder for caches: ``$VSEINF_CACHE`` if set, else ``~/.cache/vseinf``."""
    env = os.environ.get("VSEINF_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vseinf"


def _normalise_signature(signature: dict[str, Any] | None) -> dict[str, Any]:
    """The signature as it reads back from JSON (tuples become lists), so comparisons agree."""
    if signature is None:
        return {}
    if not isinstance(signature, dict):
        raise ValueError(f"signature: must be a dict, got {type(signature).__name__}")
    try:
        return json.loads(json.dumps(signature, sort_keys=True))
    except TypeError as e:
        raise ValueError(f"signature: must be JSON-serialisable ({e})") from None


def cache_path(name: str, signature: dict[str, Any] | None = None) -> Path:
    """A cache folder under :func:`cache_dir` for ``name``, distinct per signature.

    E.g. ``cache_path("flickr8k-train-grid", {"backbone": "resnet50", "size": 512})`` →
    ``~/.cache/vseinf/features/flickr8k-train-grid-3f2a9c1b7e04``.
    """
    blob = json.dumps(_normalise_signature(signature), sort_keys=True).encode()
    return cache_dir() / "features" / f"{name}-{hashlib.sha256(blob).hexdigest()[:12]}"


def _npy_header(rows: int, dim: int) -> bytes:
    """A .npy version-1.0 header for a C-order ``rows × dim`` float16 array, _HEADER_BYTES long."""
    text = "{'descr': '<f2', 'fortran_order': False, 'shape': (%d, %d), }" % (rows, dim)
    room = _HEADER_BYTES - 10  # magic (6) + version (2) + header length (2)
    if len(text) + 1 > room:
        raise ValueError(f"cache too large for its header ({rows} × {dim})")
    text = text + " " * (room - len(text) - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", room) + text.encode("latin1")


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.asarray(x)


class FeatureCacheWriter:
    """Streams feature sets into a new cache folder; publishes it atomically on :meth:`close`.

    Use as a context manager: leaving the block normally closes (publishes) the cache, leaving
    it with an exception discards the partial files.

    Args:
        directory: the cache folder to create. An existing cache there is replaced on close;
            any other non-empty folder is refused.
        dim: C, the width of every feature row.
        n_items: how many items will be appended; :meth:`close` checks it.
        set_size: rows per item when all items have the same count (grid features); ``None``
            for variable-length sets.
        keys: optional item names (e.g. image paths), stored in ``meta.json``.
        signature: what the features depend on (backbone, weights hash, input size, …);
            :class:`FeatureCache` compares it to detect a stale cache. Must be JSON-serialisable.
        resumable: keep the items written so far in ``.<name>.partial`` (recorded every
            ``checkpoint_every`` items) and continue from there: :attr:`count` says how many
            items a resumed writer already holds, and the caller appends from that item on.
            :attr:`keys` is then the list recorded with them.
        restart: with ``resumable``, drop the items a previous writer left and start over.
        checkpoint_every: items between progress records (a resumed writer repeats at most as
            many items).
    """

    def __init__(self, directory: str | os.PathLike, dim: int, n_items: int, *,
                 set_size: int | None = None, keys: Sequence[str] | None = None,
                 signature: dict[str, Any] | None = None, resumable: bool = False,
                 restart: bool = False, checkpoint_every: int = CHECKPOINT_EVERY) -> None:
        if int(dim) <= 0:
            raise ValueError(f"dim: must be positive, got {dim}")
        if int(n_items) < 0:
            raise ValueError(f"n_items: must be >= 0, got {n_items}")
        if set_size is not None and int(set_size) <= 0:
            raise ValueError(f"set_size: must be positive, got {set_size}")
        if keys is not None and len(keys) != n_items:
            raise ValueError(f"keys: {len(keys)} keys for {n_items} items")
        self.directory = Path(directory)
        self.dim, self.n_items = int(dim), int(n_items)
        self.set_size = None if set_size is None else int(set_size)
        self.keys = None if keys is None else [str(k) for k in keys]
        self.signature = _normalise_signature(signature)
        _check_replaceable(self.directory)
        if int(checkpoint_every) < 1:
            raise ValueError(f"checkpoint_every: must be positive, got {checkpoint_every}")
        self.checkpoint_every = int(checkpoint_every)
        # What is there now: a cache that appears there later was published by another process.
        self._found = _identity(self.directory)
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphans(self.directory)
        self._offsets = [0]
        self._closed = False
        self._lock = None
        self.resumed = 0
        # Hidden siblings, so the final rename stays on one file system (and is atomic).
        if resumable and self._take_partial(restart):
            return
        self._tmp = self.directory.parent / (
            f".{self.directory.name}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")
        self._tmp.mkdir()
        self._file = open(self._tmp / _FEATURES, "wb")
        self._file.write(b"\0" * _HEADER_BYTES)

    def _take_partial(self, restart: bool) -> bool:
        """Open ``.<name>.partial`` for this writer (resuming what it holds unless ``restart``);
        False when another process is writing there."""
        import fcntl

        partial = self.directory.parent / f".{self.directory.name}.partial"
        partial.mkdir(exist_ok=True)
        lock = open(partial / _LOCK, "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The folder may have been published (renamed away) between our open and our lock.
            same = os.fstat(lock.fileno()).st_ino == os.stat(partial / _LOCK).st_ino
        except OSError:
            same = False
        if not same:
            lock.close()
            return False
        self._lock, self._tmp = lock, partial
        record = None if restart else _read_progress(partial)
        expected = {"dim": self.dim, "n_items": self.n_items, "set_size": self.set_size,
                    "signature": self.signature}
        features = partial / _FEATURES
        if record is not None and all(record.get(k) == v for k, v in expected.items()) and features.is_file():
            offsets = record.get("offsets")
            size = _HEADER_BYTES + int(offsets[-1]) * self.dim * 2
            if features.stat().st_size >= size:
                self._file = open(features, "r+b")
                self._file.truncate(size)  # items written after the last record are written again
                self._file.seek(size)
                self._offsets = [int(o) for o in offsets]
                if record.get("keys") is not None:
                    self.keys = list(record["keys"])
                self.resumed = self.count
                return True
        for leftover in (features, partial / _PROGRESS, partial / _OFFSETS, partial / _META):
            leftover.unlink(missing_ok=True)
        self._file = open(features, "wb")
        self._file.write(b"\0" * _HEADER_BYTES)
        return True

    def checkpoint(self) -> None:
        """Record the items written so far (resumable writers; called every ``checkpoint_every`` items)."""
        if self._lock is None or self._closed:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        record = {"dim": self.dim, "n_items": self.n_items, "set_size": self.set_size,
                  "signature": self.signature, "offsets": self._offsets, "keys": self.keys}
        tmp = self._tmp / (_PROGRESS + ".tmp")
        tmp.write_text(json.dumps(record), encoding="utf-8")
        os.replace(tmp, self._tmp / _PROGRESS)

    @property
    def count(self) -> int:
        """Items appended so far."""
        return len(self._offsets) - 1

    def append(self, features: np.ndarray | torch.Tensor) -> None:
        """Adds the next item: an ``L × C`` array (``L == set_size`` for fixed-size caches)."""
        self._check_open()
        x = _as_numpy(features)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"item {self.count}: expected an L×{self.dim} array, got shape "
                             f"{x.shape}")
        if self.set_size is not None and x.shape[0] != self.set_size:
            raise ValueError(f"item {self.count}: expected {self.set_size} rows (set_size), "
                             f"got {x.shape[0]}")
        if self.count >= self.n_items:
            raise ValueError(f"{self.directory}: more than the announced {self.n_items} items")
        with np.errstate(over="ignore"):
            half = np.ascontiguousarray(x, dtype="<f2")
        if not np.isfinite(half).all():
            # Values beyond ±65504 overflow fp16; a silent inf would poison training later.
            raise ValueError(f"item {self.count}: non-finite values or values beyond the "
                             "float16 range (±65504)")
        self._file.write(half.tobytes())
        self._offsets.append(self._offsets[-1] + x.shape[0])
        if self._lock is not None and self.count % self.checkpoint_every == 0 and self.count < self.n_items:
            self.checkpoint()

    def append_batch(self, features: np.ndarray | torch.Tensor,
                     lengths: Sequence[int] | np.ndarray | torch.Tensor | None = None) -> None:
        """Adds B items from a padded ``B × L × C`` batch; item b keeps ``lengths[b]`` rows."""
        x = _as_numpy(features)
        if x.ndim != 3:
            raise ValueError(f"expected a B×L×C batch, got shape {x.shape}")
        lens = ([x.shape[1]] * x.shape[0] if lengths is None
                else [int(n) for n in _as_numpy(lengths).reshape(-1)])
        if len(lens) != x.shape[0] or any(n < 0 or n > x.shape[1] for n in lens):
            raise ValueError(f"lengths: need {x.shape[0]} values in [0, {x.shape[1]}]")
        for b, n in enumerate(lens):
            self.append(x[b, :n])

    def close(self) -> FeatureCache:
        """Finishes the files and renames the folder into place; returns a reader on it."""
        self._check_open()
        if self.count != self.n_items:
            self.abort()
            raise ValueError(f"{self.directory}: closed after {self.count} of {self.n_items} "
                             "items; nothing was written")
        total = self._offsets[-1]
        self._file.seek(0)
        self._file.write(_npy_header(total, self.dim))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        np.save(self._tmp / _OFFSETS, np.asarray(self._offsets, dtype=np.int64))
        meta = {
            "format": FORMAT, "version": VERSION, "dtype": "float16",
            "dim": self.dim, "n_items": self.n_items, "total_rows": int(total),
            "set_size": self.set_size, "keys": self.keys, "signature": self.signature,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        # meta.json is what marks a folder as a cache; it goes in last.
        (self._tmp / _META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        FeatureCache(self._tmp)  # reads back every check before anything is published
        self._closed = True
        try:
            cache = self._publish()
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._release()
            raise
        if self._lock is not None:
            # Held until the folder has moved, so no other writer resumes from it meanwhile; the
            # progress record and the lock file are not part of a cache.
            self._release()
            for name in (_PROGRESS, _LOCK):
                (self.directory / name).unlink(missing_ok=True)
        return cache

    def _publish(self) -> FeatureCache:
        # Several processes may build the same cache at once (a sweep of runs, every machine of a
        # distributed job on a shared file system). The first to finish publishes; a later one
        # keeps that cache and drops its own, so nobody's open cache is pulled away. A cache that
        # was already there when this writer started (stale, or being rebuilt) is replaced.
        for _ in range(3):
            theirs = self._published_meanwhile()
            if theirs is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                return theirs
            _check_replaceable(self.directory)
            old = None
            if self.directory.exists():
                old = self.directory.parent / f".{self.directory.name}.old-{secrets.token_hex(4)}"
                os.replace(self.directory, old)
            try:
                os.replace(self._tmp, self.directory)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # Another process renamed its cache into place between the check and the rename.
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
                continue
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return FeatureCache(self.directory)
        raise CacheError(f"{self.directory}: could not publish the cache (other processes kept "
                         "replacing the folder)")

    def _published_meanwhile(self) -> FeatureCache | None:
        now = _identity(self.directory)
        if now is None or now == self._found:
            return None
        try:
            return FeatureCache(self.directory, signature=self.signature)
        except CacheError:
            return None

    def abort(self) -> None:
        """Stops writing; nothing at ``directory`` changes. A resumable writer keeps the items up to
        its last progress record for the next writer; any other discards everything."""
        if self._closed:
            return
        self._closed = True
        self._file.close()
        if self._lock is not None:
            self._release()
            return
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the lock
            self._lock = None

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.directory}: writer already closed")

    def __enter__(self) -> FeatureCacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


_HOST = socket.gethostname().replace("-", "_") or "host"


def _remove_orphans(directory: Path) -> None:
    """Remove the private temporary folders of ``directory``'s writers that were killed on this
    machine (their process is gone). Folders of other machines (a shared file system) are kept."""
    prefix = f".{directory.name}.tmp-{_HOST}-"
    try:
        candidates = [p for p in directory.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return
    for path in candidates:
        pid = path.name[len(prefix):].split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _read_progress(partial: Path) -> dict | None:
    try:
        record = json.loads((partial / _PROGRESS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    offsets = record.get("offsets") if isinstance(record, dict) else None
    if not isinstance(offsets, list) or not offsets or offsets[0] != 0 or \
            not all(isinstance(o, int) for o in offsets) or any(b < a for a, b in zip(offsets, offsets[1:])):
        return None
    return record


def _identity(directory: Path) -> tuple[int, int] | None:
    """Which folder is at ``directory`` (device, inode), or ``None``; publishing renames a new
    folder into place, so the identity changes whenever a cache is (re)published."""
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _check_replaceable(directory: Path) -> None:
    """Refuses to overwrite a non-empty folder that is not a feature cache."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"{directory}: exists and is not a folder")
    meta = directory / _META
    if any(directory.iterdir()) and not meta.is_file():
        raise ValueError(f"{directory}: not empty and not a feature cache; refusing to replace it")


class FeatureCache:
    """Reads a cache written by :class:`FeatureCacheWriter`; features stay memory-mapped.

    Args:
        directory: the cache folder.
        signature: if given, the signature the cache must have been written with; a different
            one raises :class:`StaleCacheError`.

    Raises:
        CacheError: no complete cache in ``directory``, or its files disagree.
    """

    def __init__(self, directory: str | os.PathLike,
                 signature: dict[str, Any] | None = None) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / _META
        if not meta_path.is_file():
            raise CacheError(f"{self.directory}: no feature cache here (no {_META}; an "
                             "extraction that did not finish leaves none)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheError(f"{meta_path}: unreadable ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CacheError(f"{meta_path}: field 'format': not a {FORMAT} folder")
        if meta.get("version") != VERSION:
            raise CacheError(f"{meta_path}: field 'version': {meta.get('version')!r}, this "
                             f"vseinf reads version {VERSION}")
        self.meta: dict[str, Any] = meta
        if signature is not None and not self.matches(signature):
            raise StaleCacheError(f"{self.directory}: built with a different signature: "
                                  f"{_signature_diff(meta.get('signature') or {}, signature)}")
        try:
            self._features = np.load(self.directory / _FEATURES, mmap_mode="r", allow_pickle=False)
            self._offsets = np.load(self.directory / _OFFSETS, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CacheError(f"{self.directory}: unreadable cache files ({e})") from None
        n, dim, total = meta.get("n_items"), meta.get("dim"), meta.get("total_rows")
        for field, value in (("n_items", n), ("dim", dim), ("total_rows", total)):
            if not isinstance(value, int) or value < 0:
                raise CacheError(f"{meta_path}: field {field!r}: expected a count, got {value!r}")
        if self._features.dtype != np.float16 or self._features.shape != (total, dim):
            raise CacheError(f"{self.directory / _FEATURES}: shape {self._features.shape} "
                             f"{self._features.dtype}, {_META} says ({total}, {dim}) float16")
        offs = self._offsets
        if (offs.dtype != np.int64 or offs.shape != (n + 1,) or offs[0] != 0 or offs[-1] != total
                or (np.diff(offs) < 0).any()):
            raise CacheError(f"{self.directory / _OFFSETS}: offsets do not describe {n} items "
                             f"over {total} rows")
        self._lengths = np.diff(offs)
        size = meta.get("set_size")
        if size is not None and (self._lengths != size).any():
            raise CacheError(f"{self.directory}: set_size {size} but items of other lengths")

    def matches(self, signature: dict[str, Any]) -> bool:
        """Whether the cache was written with exactly this signature."""
        return (self.meta.get("signature") or {}) == _normalise_signature(signature)

    def __len__(self) -> int:
        return len(self._lengths)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def set_size(self) -> int | None:
        return self.meta.get("set_size")

    @property
    def keys(self) -> list[str] | None:
        return self.meta.get("keys")

    @property
    def signature(self) -> dict[str, Any]:
        return self.meta.get("signature") or {}

    @property
    def lengths(self) -> np.ndarray:
        """int64 ``[n_items]``: rows per item."""
        return self._lengths

    def _index(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"item {i} out of range for a cache of {n} items")
        return i % n

    def __getitem__(self, i: int) -> np.ndarray:
        """Item ``i``'s rows: a read-only float16 ``L_i × C`` view into the memory map."""
        i = self._index(i)
        return self._features[self._offsets[i]:self._offsets[i + 1]]

    def batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Items as a zero-padded float32 batch ``B × Lmax × C`` and their lengths (Long)."""
        idx = np.asarray([self._index(i) for i in _as_numpy(indices).reshape(-1)], dtype=np.int64)
        lengths = self._lengths[idx]
        if self.set_size is not None:
            # Fixed-size sets: one gather over an (n, N, C) view reads just the chosen items.
            view = self._features.reshape(len(self), self.set_size, self.dim)
            out = np.asarray(view[idx], dtype=np.float32)
        else:
            out = np.zeros((len(idx), int(lengths.max(initial=0)), self.dim), dtype=np.float32)
            for b, i in enumerate(idx):
                out[b, :lengths[b]] = self._features[self._offsets[i]:self._offsets[i + 1]]
        return torch.from_numpy(out), torch.from_numpy(lengths.astype(np.int64))

    def batch_reference(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The slow, obviously-right twin of :meth:`batch`: one item at a time, padded by torch."""
        items = [torch.tensor(np.array(self[i], dtype=np.float32)).reshape(-1, self.dim)
                 for i in indices]
        lengths = torch.tensor([len(t) for t in items], dtype=torch.long)
        if not items:
            return torch.zeros(0, 0, self.dim), lengths
        return torch.nn.utils.rnn.pad_sequence(items, batch_first=True), lengths

    def __repr__(self) -> str:
        shape = f"{self.set_size}×{self.dim}" if self.set_size else f"L×{self.dim}"
        return f"FeatureCache({str(self.directory)!r}, {len(self)} items of {shape})"


def _signature_diff(have: dict[str, Any], want: dict[str, Any]) -> str:
    want = _normalise_signature(want)
    fields = sorted(set(have) | set(want))
    diffs = [f"{k}: cached {have.get(k)!r}, wanted {want.get(k)!r}" for k in fields
             if have.get(k) != want.get(k)]
    return "; ".join(diffs) or "(none)"


def open_cache(directory: str | os.PathLike,
               signature: dict[str, Any] | None = None) -> FeatureCache | None:
    """The cache at ``directory`` if it is complete and matches ``signature``, else ``None``.

    ``None`` means "(re)build it": the reason is logged. Use :class:`FeatureCache` directly to
    get an error instead.
    """
    try:
        return FeatureCache(directory, signature=signature)
    except CacheError as e:
        if Path(directory).exists():
            log.info("not using feature cache: %s", e)
        return None
