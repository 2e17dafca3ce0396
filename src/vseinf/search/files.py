"""The index folder on disk: what it holds, how it is written and how its files are read back.

An index is a directory::

    embeddings.npy   n × d float32, one unit-norm row per gallery item (row i ↔ items[i])
    gallery.json     what the rows are (paths, captions or clips), the model that made them, the engine
    faiss.index      only for the approximate engines: an HNSW graph over the same rows, or an
                     IVF-PQ index of their compressed codes
    thumb-*.jpg      image galleries: one thumbnail per image; video galleries made from video files:
                     one middle-frame thumbnail per clip

Writing (:func:`_write_index`): the folder is replaced atomically, so an interrupted run leaves
the previous index intact; one process at a time writes it (:class:`IndexLock`), and a folder
holding files vseinf did not write is refused rather than replaced. Reading: ``gallery.json`` is
checked against a schema (:func:`meta_schema`, :func:`_parse_meta`) and the embeddings file against
its header (:func:`read_rows`).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from .engines import GalleryIndex, IndexFormatError, _faiss, _FaissEngine
from .sources import printable

# ---------------------------------------------------------------------------------------------
# What an index folder holds


FORMAT_VERSION = 1
EMBEDDINGS_FILE = "embeddings.npy"
META_FILE = "gallery.json"
FAISS_FILE = "faiss.index"


# Thumbnails of video clips: small JPEGs named by a hash of the clip's path, kept flat in the index
# directory (the atomic directory swap handles plain files only). The name pattern is also what the
# web app checks before serving one, so gallery.json cannot point it at another file.
THUMB_SIZE = 256
THUMB_RE = re.compile(r"thumb-[0-9a-f]{20}\.jpg")


def thumb_name(rel: str) -> str:
    """The thumbnail file name of a clip (a hash of its gallery path: safe whatever the path holds)."""
    return f"thumb-{hashlib.sha1(rel.encode('utf-8', 'surrogatepass')).hexdigest()[:20]}.jpg"


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


# ---------------------------------------------------------------------------------------------
# Writing it: the folder is replaced whole


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


# ---------------------------------------------------------------------------------------------
# One writer at a time


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
            import fcntl  # not on Windows, which takes no lock
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


# ---------------------------------------------------------------------------------------------
# Reading it back


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
    from typing import Literal, Optional, Union

    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

    class Open(BaseModel):
        model_config = ConfigDict(extra="allow")

    positive = Field(None, gt=0)

    class ModelInfo(Open):
        checkpoint: Optional[StrictStr] = None
        bundled: Union[StrictStr, StrictBool, None] = None  # a bundled model's name (True: older indexes)
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
    from pydantic import ValidationError  # on first use, as in meta_schema

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
