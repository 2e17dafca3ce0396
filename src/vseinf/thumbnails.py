"""Image thumbnails: made once when a gallery is encoded, decoded small, and few at a time.

A 144-megapixel photo decoded at full size takes ~0.5 GB per copy, and a naive thumbnail makes
three (decode, upright, RGB); four browsers asking for it at once took 6.9 GB. So:

- :func:`load_thumbnail` decodes small: JPEGs through ``Image.draft`` (the decoder itself scales
  by 1/2…1/8), other formats shrunk by ``reduce`` (an integer box filter) straight after decoding,
  and only the small image is turned upright and converted to RGB (formats without a draft mode,
  PNG or TIFF, are still decoded whole once: hence the cap on decodes at a time);
- :func:`make_image_thumbnails` stores one JPEG per image in the index folder when it is encoded
  (``thumb-<hash>.jpg``, as video clips already have), so the server reads a few KB instead of
  decoding the photo;
- :class:`ThumbnailMaker` is the server's fallback for images without a stored thumbnail (an index
  made before, or a photo changed since): it caches the answers, decodes each photo once however
  many requests ask for it together, and at most ``max_decodes`` photos at a time.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import io
import os
import threading
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

THUMB_SIZE = 256
JPEG_QUALITY = 85
# Palette and 1-bit images resize with nearest-neighbour only: up to this many pixels they are
# converted to RGB(A) first (a full-size copy, small at this size) for a smooth thumbnail.
SMOOTH_PALETTE_PIXELS = 16_000_000


class ThumbnailError(ValueError):
    """A file whose thumbnail cannot be made (not a readable image, or too large to decode)."""


def image_thumb_name(rel: str, size: int, mtime_ns: int) -> str:
    """The stored thumbnail's file name of the image ``rel`` as it is now (size and mtime).

    A hash, so it is a safe file name whatever the path holds, and a changed photo gets a new name
    (its old thumbnail is then not taken for it). Same form as the clips' (``thumb-<20 hex>.jpg``).
    """
    key = f"{rel}\0{int(size)}\0{int(mtime_ns)}".encode("utf-8", "surrogatepass")
    return f"thumb-{hashlib.sha1(key).hexdigest()[:20]}.jpg"


def load_thumbnail(path: str | os.PathLike, size: int = THUMB_SIZE):
    """The image at ``path`` as an upright RGB ``PIL.Image`` at most ``size`` × ``size`` (aspect kept).

    Raises:
        ThumbnailError: not a readable image, or over PIL's decompression-bomb limit.
    """
    from PIL import Image, ImageOps  # lazy: keeps PIL out of a text search (vseinf.search imports this module)

    try:
        with Image.open(path) as im:
            if im.mode in ("P", "1") and im.width * im.height <= SMOOTH_PALETTE_PIXELS:
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            # With a reducing gap, thumbnail() first asks a JPEG decoder for a draft (scaled by
            # 1/2…1/8 while decoding, down to twice the size) and reduce()s other formats by an
            # integer factor right after decoding; only then does it resample to the size.
            im.thumbnail((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
            try:
                im = ImageOps.exif_transpose(im)  # on the small image: the copy costs nothing
            except Exception:  # a corrupt EXIF block: keep the pixels as stored
                pass
            return im.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ThumbnailError(f"image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ThumbnailError(f"not a readable image ({exc})") from None


def load_thumbnail_reference(path: str | os.PathLike, size: int = THUMB_SIZE):
    """:func:`load_thumbnail` the slow, obvious way (full decode, upright, RGB, then shrink); for tests."""
    from PIL import Image, ImageOps  # lazy: keeps PIL out of a text search (vseinf.search imports this module)

    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im).convert("RGB")
    im.thumbnail((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
    return im


def thumbnail_jpeg(path: str | os.PathLike, size: int = THUMB_SIZE) -> bytes:
    """JPEG bytes of :func:`load_thumbnail`."""
    buf = io.BytesIO()
    load_thumbnail(path, size).save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def make_image_thumbnails(root: Path, items: list[dict], previous: Path | None, staging: Path,
                          progress: bool = False, workers: int = 2) -> dict[str, Path]:
    """Give each image item of an index a stored thumbnail; returns the files to put in the index.

    Sets ``item["thumb"]`` to the thumbnail's file name (None when the image cannot be made into
    one: the server then makes it on request). A thumbnail the previous index already holds for the
    same file (same path, size and mtime) is reused; new ones are written to ``staging``.

    Args:
        root: the gallery folder (item paths are relative to it).
        items: the index's items, ``{"path", "size", "mtime_ns", …}``; updated in place.
        previous: the index folder being replaced (its thumbnails are reused), or None.
        staging: a folder for the new thumbnails until the index is written.
        progress: show a progress bar on stderr.
        workers: threads decoding at once (PIL decodes without holding the GIL); each holds at
            most one decoded photo.
    """
    files: dict[str, Path] = {}
    todo: list[tuple[dict, str]] = []
    for item in items:
        name = image_thumb_name(item["path"], item["size"], item["mtime_ns"])
        item["thumb"] = name
        old = previous / name if previous is not None else None
        if old is not None and old.is_file():
            files[name] = old
        else:
            todo.append((item, name))
    if not todo:
        return files

    def make(job: tuple[dict, str]) -> tuple[dict, str, bool]:
        item, name = job
        try:
            data = thumbnail_jpeg(root / item["path"])
        except (ThumbnailError, OSError):
            return item, name, False
        (staging / name).write_bytes(data)
        return item, name, True

    bar = None
    if progress:
        bar = tqdm(total=len(todo), desc="thumbnails", unit="img")
    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            for item, name, ok in pool.map(make, todo):
                if ok:
                    files[name] = staging / name
                else:
                    item["thumb"] = None
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return files


class ThumbnailMaker:
    """Thumbnails made on request: cached, each photo decoded once, few decoded at a time.

    Args:
        size: the longest side of a thumbnail.
        max_decodes: photos decoded at once, whatever the number of requests (memory: at most this
            many decoded photos).
        cache_items: thumbnails kept in memory (~15 KB each).
        make: ``(path, size) -> JPEG bytes`` (default :func:`thumbnail_jpeg`).
    """

    def __init__(self, size: int = THUMB_SIZE, max_decodes: int = 2, cache_items: int = 1024,
                 make: Callable[[Path, int], bytes] = thumbnail_jpeg):
        self.size = size
        self.cache_items = cache_items
        self._make = make
        self._decodes = threading.BoundedSemaphore(max_decodes)
        self._lock = threading.Lock()  # guards the two dicts below
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._pending: dict[tuple, threading.Lock] = {}

    def _cached(self, key) -> bytes | None:
        with self._lock:
            data = self._cache.get(key)
            if data is not None:
                self._cache.move_to_end(key)
            return data

    def get(self, path: Path) -> bytes:
        """JPEG thumbnail of ``path`` (a changed file — size or mtime — is made again).

        Raises:
            ThumbnailError: not a readable image.
            OSError: the file cannot be read any more.
        """
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        data = self._cached(key)
        if data is not None:
            return data
        with self._lock:
            key_lock = self._pending.setdefault(key, threading.Lock())
        try:
            with key_lock:  # requests for the same photo wait for the first one's decode
                data = self._cached(key)
                if data is not None:
                    return data
                with self._decodes:
                    data = self._make(path, self.size)
                with self._lock:
                    self._cache[key] = data
                    while len(self._cache) > self.cache_items:
                        self._cache.popitem(last=False)
                return data
        finally:
            with self._lock:
                if self._pending.get(key) is key_lock and not key_lock.locked():
                    del self._pending[key]
