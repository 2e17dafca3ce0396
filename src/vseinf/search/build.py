"""Encoding a gallery into an index folder (:func:`encode_gallery`).

The model embeds the gallery's items: images read ahead of the model (:func:`encode_image_files`),
captions (:func:`encode_texts_np`), video files through a :class:`vseinf.video.VideoEmbedder`, or
frame-feature files through a video model's tower. An index already in the folder is updated:
only files that are new or changed (path, size, mtime) are embedded again, removed files drop out,
and files that are not readable images are named, counted and skipped (so are video files that do
not decode, and malformed feature files). Image folders save their progress as they go
(:class:`vseinf.search.journal.EncodeJournal`), and several torchrun processes can share one.
The finished rows are written by :func:`vseinf.search.files._write_index`, under the index's lock.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from .. import __version__
from ..thumbnails import make_image_thumbnails
from .engines import IVF_MIN_ITEMS, build_engine
from .files import (
    FORMAT_VERSION,
    META_FILE,
    THUMB_RE,
    THUMB_SIZE,
    IndexLock,
    _check_out_dir,
    _tidy_leftovers,
    _write_index,
    thumb_name,
)
from .gallery import Gallery
from .identity import model_identity, same_model
from .journal import EncodeJournal, journal_dir
from .sources import (
    IMAGE_EXTENSIONS,
    Skipped,
    detect_gallery_kind,
    printable,
    read_captions_file,
    scan_images,
    scan_videos,
)

# ---------------------------------------------------------------------------------------------
# Embedding image files and texts


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    unit = {"images": "img", "videos": "clip"}.get(desc, "caption")
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)


def encode_image_files(model, paths: Sequence[str | os.PathLike], batch_size: int = 32, progress: bool = False,
                       workers: int | None = None, on_batch=None,
                       reference: bool = False) -> tuple[np.ndarray, list[int], list[Skipped]]:
    """Embed image files, skipping unreadable ones → (m × d float32, indices of encoded paths, skipped):
    :meth:`~vseinf.model.VSEModel.encode_images` with ``skip_unreadable=True``, as numpy.
    ``on_batch(embeddings m' × d float32, kept indices)`` is called after every batch."""
    def batch_done(embeddings, kept):
        on_batch(embeddings.float().cpu().numpy(), kept)

    encoded = model.encode_images(paths, batch_size, skip_unreadable=True, workers=workers, progress=progress,
                                  on_batch=batch_done if on_batch is not None else None, reference=reference)
    skipped = [Skipped(str(paths[i]), reason) for i, reason in encoded.skipped]
    return encoded.embeddings.float().cpu().numpy(), encoded.kept, skipped


def encode_texts_np(model, texts: Sequence[str], batch_size: int = 128, progress: bool = False) -> np.ndarray:
    if not texts:
        return np.zeros((0, model.config.embed_dim), np.float32)
    return model.encode_texts(list(texts), batch_size=batch_size, progress=progress).float().cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Building or updating an index


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
        from ..distributed import together  # lazy: see vseinf.search

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
    from ..video import VIDEO_SUFFIXES, VideoEmbedder  # lazy: see vseinf.search

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
            out.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.thumbs-", dir=out.parent))
            embedder = video if video is not None else VideoEmbedder.for_model(model)
            report, meta, emb, extra_files = _encode_video_folder(gallery, out, identity, embedder, staging,
                                                                  progress)
        elif gallery.is_dir():
            report, meta, emb = _encode_image_folder(gallery, out, model, identity, batch_size, progress,
                                                     workers, processes)
            out.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.thumbs-", dir=out.parent))
            # stored, so the server need not decode photos
            extra_files = make_image_thumbnails(Path(meta["root"]), meta["items"], out, staging, progress)
        elif gallery.suffix.lower() in IMAGE_EXTENSIONS:
            raise ValueError(f"{gallery}: is one image; give a folder of images or a captions text file")
        elif gallery.suffix.lower() in VIDEO_SUFFIXES:
            raise ValueError(f"{gallery}: is one video; give a folder of videos")
        else:
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


# ---------------------------------------------------------------------------------------------
# Image folders and captions files


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
    from ..distributed import in_turns, together  # lazy: see vseinf.search

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


# ---------------------------------------------------------------------------------------------
# Video files and frame features


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
    from ..video import VideoDecodeError  # lazy: see vseinf.search

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
    from ..data.video_datasets import H5Frames, find_frame_features, open_frame_features  # lazy: see vseinf.search
    from ..video import embed_frame_features

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
