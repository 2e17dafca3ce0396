"""What a gallery is made of, read before anything is embedded: the image or video files of a folder
(:func:`scan_images`, :func:`scan_videos`), the lines of a captions file (:func:`read_captions_file`),
and which of these a path holds (:func:`detect_gallery_kind`). Files that cannot be indexed are
reported as :class:`Skipped`, with the reason.

Gallery kinds (``gallery.json`` field ``kind``):

- ``images`` — a folder of image files, searched recursively;
- ``captions`` — a text file of captions;
- ``videos`` — a folder of video files (decoded with PyAV; frames sampled and embedded by
  :class:`vseinf.video.VideoEmbedder`: a video model's frame extractor + video tower, or an image
  model frame by frame), or frame-feature files (a folder of ``<id>.npy``, or an ``.h5`` file)
  embedded by a video model's tower. A folder is taken for videos when it holds video files and
  no images, for frame features when it holds neither (``--kind`` says so explicitly).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
KINDS = ("images", "captions", "videos")


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
    from ..video import VIDEO_SUFFIXES  # lazy: see vseinf.search

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
    from ..video import VIDEO_SUFFIXES  # lazy: see vseinf.search

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
    from ..data.video_datasets import find_frame_features  # lazy: see vseinf.search

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


def printable(name: str) -> str:
    """A file name as text that can be printed: bytes that are not UTF-8 (kept by Python as lone
    surrogates, see :func:`os.fsdecode`) are shown as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")
