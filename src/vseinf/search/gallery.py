"""A loaded index (:class:`Gallery`): its items, its rows and a search engine over them, and what
turns a query (an image, a video, a file of frame features) into a vector in the gallery's space.

Loading reads every file from the one folder opened first, so a ``vseinf encode`` swapping a new
index in meanwhile gives the old index or the new one, never a mix; a long-running reader (the web
app) notices a replaced index (:meth:`Gallery.replaced`) and reloads it.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .engines import (
    ENGINE_SETTINGS,
    ENGINES,
    HNSW_EF_SEARCH,
    IVF_NPROBE,
    IVF_RERANK,
    ExactIndex,
    GalleryIndex,
    HNSWIndex,
    IndexFormatError,
    IVFPQIndex,
    faiss_available,
)
from .files import (
    EMBEDDINGS_FILE,
    FAISS_FILE,
    META_FILE,
    THUMB_RE,
    _non_finite_row,
    _parse_meta,
    _read_faiss,
    read_rows,
)
from .identity import model_identity, same_model
from .sources import printable


class _Replaced(Exception):
    """The index folder was replaced by a new one while it was being read."""


def _file_id(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


# ---------------------------------------------------------------------------------------------
# A loaded index


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
        from ..video import VideoEmbedder  # lazy: see vseinf.search

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
        from ..model import load_model  # lazy: see vseinf.search

        info = self.meta["model"]
        if model_path is None:
            if info.get("bundled"):  # a name; True in indexes older than the named bundled models
                name = info["bundled"] if isinstance(info["bundled"], str) else None
                model = load_model(name, device=device, text_only=text_only)
            elif info.get("checkpoint") and Path(info["checkpoint"]).is_dir():
                model = load_model(info["checkpoint"], device=device, text_only=text_only)
            else:
                raise ValueError(f"{self.path}: the model that built this index ({info.get('checkpoint')}) is "
                                 "not there any more; pass --model CHECKPOINT")
        else:
            model = load_model(model_path, device=device, text_only=text_only)
        check_model(self, model)
        return model


# ---------------------------------------------------------------------------------------------
# Queries in the gallery's space


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
        import torch  # lazy: see vseinf.search

        return model.encode_image_features([torch.from_numpy(feats)]).float().cpu().numpy()
    return gallery.video_embedder(model).embed_file(path)[0][None, :]


def load_query_image(data: bytes | str | os.PathLike, max_pixels: int = 64_000_000):
    """An uploaded or named image as RGB; ValueError (BadImageError for files) if it is not a readable image."""
    from PIL import Image

    from ..data.images import load_rgb  # lazy: see vseinf.search

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
