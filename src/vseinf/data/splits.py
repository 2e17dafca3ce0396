"""Image-caption datasets: a reader for each layout users have, and :func:`open_split`.

Every reader returns the same record, :class:`~vseinf.data.records.CaptionSplit`, so the rest of
the library never cares where the captions came from:

- :func:`read_flickr8k` — the Flickr8k distribution (``Flickr8k_text/`` + ``Flicker8k_Dataset/``);
- :func:`read_flickr_token_file` — any ``<image>#<n>\\t<caption>`` file (Flickr8k, Flickr30k);
- :func:`read_karpathy_json` — Karpathy's ``dataset_{coco,flickr30k,flickr8k}.json`` splits;
- :func:`read_precomp` — the SCAN / VSE++ "precomp" layout of precomputed region features;
- :func:`read_pairs_file` — a CSV / JSONL / TSV list of (image, caption) pairs;
- :func:`open_split` — guesses the layout from a path and calls one of the above (or, for a
  video dataset, :func:`vseinf.data.video_datasets.open_video_split`).

Readers never assume five captions per image: an image may have any number of captions, and
images without any caption are dropped (with a log line). Captions are grouped by image, in
image order, so ``caption_to_image`` is non-decreasing.

Errors a user can cause (a malformed line, a missing field, a missing file) raise
:class:`DataFormatError`, a ``ValueError`` whose message starts with ``file:line`` or names the
JSON field.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .jsonl import parse_jsonl_pairs
from .records import (
    CaptionSplit,
    DataFormatError,
    canonical_split,
    group_pairs,
    read_lines,
    read_text,
    rows_of_split,
)
from .video_datasets import is_video_dataset, open_video_split

log = logging.getLogger(__name__)

__all__ = [
    "CaptionSplit",
    "DataFormatError",
    "open_split",
    "read_flickr8k",
    "read_flickr_token_file",
    "read_karpathy_json",
    "read_pairs_file",
    "read_precomp",
]


# --------------------------------------------------------------------------------------------
# Flickr token files and the Flickr8k distribution
# --------------------------------------------------------------------------------------------


def _parse_token_line(path: Path, lineno: int, line: str, require_number: bool) -> tuple[str, str]:
    """Parses ``<image>#<n>\\t<caption>`` (``#<n>`` optional unless required)."""
    if "\t" not in line:
        raise DataFormatError(path, "expected '<image>#<n><TAB><caption>' (no tab found)",
                              line=lineno)
    image, caption = line.split("\t", 1)
    image, caption = image.strip(), caption.strip()
    if "#" in image:
        image, number = image.rsplit("#", 1)
        if not number.isdigit():
            raise DataFormatError(path, f"caption number {number!r} after '#' is not an integer",
                                  line=lineno)
    elif require_number:
        raise DataFormatError(path, "expected '<image>#<n>' before the tab", line=lineno)
    if not image:
        raise DataFormatError(path, "empty image name", line=lineno)
    if not caption:
        raise DataFormatError(path, f"empty caption for {image!r}", line=lineno)
    return image, caption


def _read_image_list(path: Path) -> list[str]:
    names: list[str] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(read_lines(path), 1):
        name = raw.strip()
        if not name:
            continue
        if name in seen:
            raise DataFormatError(path, f"{name!r} is listed twice (first on line {seen[name]})",
                                  line=lineno)
        seen[name] = lineno
        names.append(name)
    return names


def read_flickr_token_file(token_path: str | os.PathLike, image_root: str | os.PathLike | None,
                           image_list: str | os.PathLike | Iterable[str] | None = None,
                           name: str | None = None) -> CaptionSplit:
    """Reads a Flickr-style caption file: one ``<image>#<n>\\t<caption>`` a line.

    Args:
        token_path: the caption file (e.g. ``Flickr8k.token.txt``, ``results_20130124.token``).
        image_root: the folder holding the images (``None``: the token file's folder).
        image_list: keep only these images, in this order: a file with one name a line
            (e.g. ``Flickr_8k.trainImages.txt``) or an iterable of names. ``None``: every image
            in the token file, in order of first appearance.
        name: the split's label (default: the token file's name).
    """
    token_path = Path(token_path)
    pairs = []
    for lineno, line in enumerate(read_lines(token_path), 1):
        if line.strip():
            pairs.append(_parse_token_line(token_path, lineno, line, require_number=True))
    if not pairs:
        raise DataFormatError(token_path, "no captions in file")
    order = None
    if image_list is not None:
        order = (_read_image_list(Path(image_list)) if isinstance(image_list, (str, os.PathLike))
                 else list(image_list))
        wanted = set(order)
        pairs = [p for p in pairs if p[0] in wanted]
    root = Path(image_root) if image_root is not None else token_path.parent
    split = group_pairs(name or token_path.name, pairs, root, order)
    if split.n_images == 0:
        raise DataFormatError(Path(image_list) if isinstance(image_list, (str, os.PathLike))
                              else token_path, "none of the listed images has a caption")
    return split


_FLICKR8K_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
                         "test": "Flickr_8k.testImages.txt"}
# The official archive spells the image folder "Flicker8k_Dataset"; some re-packs fix the typo.
_FLICKR8K_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset")


def read_flickr8k(root: str | os.PathLike, split: str) -> CaptionSplit:
    """Reads one split of the Flickr8k distribution.

    Args:
        root: the folder holding ``Flickr8k_text/`` (``Flickr8k.token.txt`` and the
            ``Flickr_8k.{train,dev,test}Images.txt`` lists) and ``Flicker8k_Dataset/`` (or
            ``Flickr8k_Dataset/``) with the JPEGs.
        split: ``"train"``, ``"dev"`` (alias ``"val"``) or ``"test"``.
    """
    root = Path(root)
    s = canonical_split(split)
    if s not in _FLICKR8K_SPLIT_FILES:
        raise ValueError(f"{root}: unknown Flickr8k split {split!r} (use train, dev/val or test)")
    text = root / "Flickr8k_text"
    if not text.is_dir():
        raise DataFormatError(text, "folder not found (expected the Flickr8k_text/ folder of the "
                                    "Flickr8k distribution)")
    images = next((root / d for d in _FLICKR8K_IMAGE_DIRS if (root / d).is_dir()), None)
    if images is None:
        raise DataFormatError(root, "no image folder: expected Flicker8k_Dataset/ or "
                                    "Flickr8k_Dataset/")
    return read_flickr_token_file(text / "Flickr8k.token.txt", images,
                                  image_list=text / _FLICKR8K_SPLIT_FILES[s], name=f"flickr8k/{s}")


# --------------------------------------------------------------------------------------------
# Karpathy split JSON
# --------------------------------------------------------------------------------------------


def read_karpathy_json(json_path: str | os.PathLike, image_root: str | os.PathLike | None,
                       split: str, restval_into_train: bool = True) -> CaptionSplit:
    """Reads one split of a Karpathy split file (``dataset_coco.json`` and friends).

    Args:
        json_path: the JSON file: ``{"images": [{"filename", "filepath"?, "split",
            "sentences": [{"raw", "tokens"?}, ...]}, ...]}``.
        image_root: the folder the images are under; COCO entries carry a ``filepath``
            (``train2014``/``val2014``) that is joined in between. ``None``: the JSON's folder.
        split: ``"train"``, ``"val"`` (alias ``"dev"``), ``"test"`` or ``"restval"``.
        restval_into_train: fold the ``restval`` images into ``train``, as the VSE line of
            work does for COCO (113,287 training images instead of 82,783).
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise DataFormatError(json_path, "file not found")
    try:
        doc = json.loads(read_text(json_path))
    except json.JSONDecodeError as e:
        raise DataFormatError(json_path, f"invalid JSON: {e.msg}", line=e.lineno) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DataFormatError(json_path, "expected an object with an 'images' list", field="images")
    wanted = {"dev": "val"}.get(canonical_split(split), canonical_split(split))
    if wanted not in {"train", "val", "test", "restval"}:
        raise ValueError(f"{json_path}: unknown split {split!r} (use train, val, test or restval)")
    accept = {"train", "restval"} if wanted == "train" and restval_into_train else {wanted}

    pairs: list[tuple[str, str]] = []
    for i, entry in enumerate(doc["images"]):
        where = f"images[{i}]"
        if not isinstance(entry, dict):
            raise DataFormatError(json_path, "expected an object", field=where)
        entry_split = entry.get("split")
        if not isinstance(entry_split, str):
            raise DataFormatError(json_path, "missing or non-string 'split'",
                                  field=f"{where}.split")
        if entry_split not in accept:
            continue
        filename = entry.get("filename")
        if not isinstance(filename, str) or not filename:
            raise DataFormatError(json_path, "missing or empty 'filename'",
                                  field=f"{where}.filename")
        filepath = entry.get("filepath")
        if filepath is not None and not isinstance(filepath, str):
            raise DataFormatError(json_path, "'filepath' must be a string",
                                  field=f"{where}.filepath")
        key = f"{filepath}/{filename}" if filepath else filename
        sentences = entry.get("sentences")
        if not isinstance(sentences, list):
            raise DataFormatError(json_path, "missing 'sentences' list", field=f"{where}.sentences")
        for j, sent in enumerate(sentences):
            sfield = f"{where}.sentences[{j}]"
            raw = sent.get("raw") if isinstance(sent, dict) else None
            if raw is None and isinstance(sent, dict) and isinstance(sent.get("tokens"), list):
                raw = " ".join(map(str, sent["tokens"]))  # some exports keep only tokens
            if not isinstance(raw, str) or not raw.strip():
                raise DataFormatError(json_path, "missing or empty caption ('raw')",
                                      field=f"{sfield}.raw")
            pairs.append((key, raw.strip()))
    keys_in_order = list(dict.fromkeys(k for k, _ in pairs))
    root = Path(image_root) if image_root is not None else json_path.parent
    split_rec = group_pairs(f"{json_path.stem}/{wanted}", pairs, root, keys_in_order)
    if split_rec.n_images == 0:
        raise DataFormatError(json_path, f"no captioned images in split {wanted!r}", field="images")
    return split_rec


# --------------------------------------------------------------------------------------------
# Precomputed region features (SCAN / VSE++ "precomp" layout)
# --------------------------------------------------------------------------------------------


def _precomp_dir(root: Path) -> Path:
    """``root`` itself or ``root/precomp``, whichever holds ``*_ims.npy`` files."""
    for d in (root, root / "precomp"):
        if d.is_dir() and any(d.glob("*_ims.npy")):
            return d
    raise DataFormatError(root, "no '<split>_ims.npy' files here or in precomp/")


def _precomp_split_name(folder: Path, split: str) -> str:
    s = canonical_split(split)
    candidates = [s] + (["val"] if s == "dev" else [])
    for c in candidates:
        if (folder / f"{c}_ims.npy").is_file():
            return c
    have = sorted(p.name[: -len("_ims.npy")] for p in folder.glob("*_ims.npy"))
    raise DataFormatError(folder / f"{s}_ims.npy",
                          f"file not found (splits here: {', '.join(have) or 'none'})")


def _repeat_run(features: np.ndarray) -> int:
    """How many times row 0 repeats at the start (1 when it doesn't); reads a few rows only."""
    k = 1
    while k < min(len(features), 10) and np.array_equal(features[k], features[0]):
        k += 1
    return k


def read_precomp(root: str | os.PathLike, split: str,
                 collapse_repeats: bool = False) -> CaptionSplit:
    """Reads one split of precomputed features: ``<split>_ims.npy`` + ``<split>_caps.txt``.

    The feature file (``N×R×D``, e.g. ``N×36×2048`` float32 BUTD regions) is memory-mapped,
    never loaded: COCO's training file is about 33 GB. Captions are one a line, in image order,
    ``k = n_captions / N`` per image (an error when that does not divide). An optional
    ``<split>_ids.txt`` with one id per image names the images; otherwise they are ``"0"``,
    ``"1"``, …

    Some releases store every image row once per caption (``N == n_captions``, e.g. 5
    identical rows in a row). Such a file reads as one image per caption, which is wrong for
    image-to-text retrieval; a warning says so, and ``collapse_repeats=True`` keeps every k-th
    row instead (still memory-mapped).

    Args:
        root: the folder with the files, or its parent holding ``precomp/``.
        split: e.g. ``"train"``, ``"dev"`` (alias ``"val"``), ``"test"``, ``"testall"``.
        collapse_repeats: fold runs of identical rows into one image (see above).
    """
    folder = _precomp_dir(Path(root))
    s = _precomp_split_name(folder, split)
    ims_path, caps_path = folder / f"{s}_ims.npy", folder / f"{s}_caps.txt"
    try:
        features = np.load(ims_path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataFormatError(ims_path, f"not a readable .npy array ({e})") from None
    if features.ndim != 3:
        raise DataFormatError(ims_path, f"expected an N×R×D array of region features, "
                                        f"got shape {features.shape}")
    lines = read_lines(caps_path)
    while lines and not lines[-1].strip():  # a trailing blank line is not a caption
        lines.pop()
    captions = [ln.strip() for ln in lines]
    for lineno, c in enumerate(captions, 1):
        if not c:
            # The line still counts: dropping it would misalign every caption after it.
            log.warning("%s:%d: empty caption", caps_path, lineno)
    n_images, n_caps = len(features), len(captions)
    if n_images == 0 or n_caps == 0:
        raise DataFormatError(ims_path if n_images == 0 else caps_path, "empty split")
    if n_caps % n_images:
        raise DataFormatError(caps_path, f"{n_caps} captions do not divide evenly over the "
                                         f"{n_images} images of {ims_path.name}")
    ids_path = folder / f"{s}_ids.txt"
    ids = [x.strip() for x in read_lines(ids_path) if x.strip()] if ids_path.is_file() else None

    stride = 1
    if n_images == n_caps and n_images > 1:
        run = _repeat_run(features)
        if run > 1 and n_images % run == 0:
            if collapse_repeats:
                stride = run
            else:
                log.warning("%s: the first %d rows are identical; this release may store each "
                            "image once per caption. Pass collapse_repeats=True to read one "
                            "image per %d rows.", ims_path, run, run)
    if stride > 1:
        features = features[::stride]  # a strided view of the memmap, still not loaded
        n_images = len(features)
        ids = ids[::stride] if ids is not None and len(ids) == n_caps else ids
    k = n_caps // n_images
    if ids is not None and len(ids) != n_images:
        log.warning("%s: %d ids for %d images; ignoring it", ids_path, len(ids), n_images)
        ids = None
    return CaptionSplit(
        name=f"precomp:{folder.name}/{s}",
        image_keys=ids if ids is not None else [str(i) for i in range(n_images)],
        image_root=None,
        captions=captions,
        caption_to_image=np.repeat(np.arange(n_images, dtype=np.int64), k),
        features=features,
    )


# --------------------------------------------------------------------------------------------
# Pair files: CSV / JSONL / TSV
# --------------------------------------------------------------------------------------------

_IMAGE_COLUMNS = ("image", "filename", "file", "path", "image_path")
_CAPTION_COLUMNS = ("caption", "text", "sentence")


def _pick_column(header: list[str], choices: tuple[str, ...]) -> str | None:
    lowered = {h.strip().lower(): h for h in header}
    return next((lowered[c] for c in choices if c in lowered), None)


def _normalise_key(key: str) -> str:
    # "./a.jpg" and "a.jpg" are the same image; keep forward slashes for portability.
    return os.path.normpath(key.strip()).replace(os.sep, "/")


def _pairs_from_csv(path: Path, lines: list[str]) -> tuple[list[tuple[str, str, str | None, int]], bool]:
    """The rows (image, caption, split or None, line) and whether the header has a split column."""
    reader = csv.reader([ln + "\n" for ln in lines])
    try:
        header = next(reader)
    except StopIteration:
        raise DataFormatError(path, "empty file") from None
    image_col = _pick_column(header, _IMAGE_COLUMNS)
    caption_col = _pick_column(header, _CAPTION_COLUMNS)
    if image_col is None or caption_col is None:
        raise DataFormatError(path, f"the header {header!r} needs an 'image' and a 'caption' "
                                    "column", line=1)
    ii, ci = header.index(image_col), header.index(caption_col)
    si = header.index(s) if (s := _pick_column(header, ("split",))) is not None else None
    rows = []
    lineno = reader.line_num
    try:
        for row in reader:
            start, lineno = lineno + 1, reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) > len(header) and ci == len(header) - 1:
                # Some exports (Kaggle's Flickr8k captions.txt) leave commas in the last,
                # caption column unquoted: the extra cells are part of the caption.
                row = row[:ci] + [",".join(row[ci:])]
            if len(row) != len(header):
                raise DataFormatError(path, f"{len(row)} columns, the header has {len(header)}",
                                      line=start)
            image, caption = row[ii].strip(), row[ci].strip()
            if not image:
                raise DataFormatError(path, "empty image", line=start)
            if not caption:
                raise DataFormatError(path, "empty caption", line=start)
            rows.append((image, caption, row[si].strip() if si is not None else None, start))
    except csv.Error as e:
        raise DataFormatError(path, f"malformed CSV ({e})", line=reader.line_num) from None
    if not rows:
        raise DataFormatError(path, "no (image, caption) rows below the header")
    return rows, si is not None


def _pairs_from_tsv(path: Path, lines: list[str]) -> tuple[list[tuple[str, str, str | None, int]], bool]:
    return [(*_parse_token_line(path, lineno, line, require_number=False), None, lineno)
            for lineno, line in enumerate(lines, 1) if line.strip()], False


def read_pairs_file(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                    split: str | None = None) -> CaptionSplit:
    """Reads (image, caption) pairs from a CSV, JSONL or tab-separated text file.

    Formats (several rows may name the same image; its captions are gathered in file order):

    - ``.csv``: a header with an ``image`` and a ``caption`` column (aliases: filename/file/
      path, text/sentence), e.g. Kaggle's Flickr8k ``captions.txt``;
    - ``.jsonl``: one ``{"image": ..., "caption": ...}`` object a line (``caption`` may also
      be a list of strings);
    - ``.txt``/``.tsv``: CSV as above when the first line has no tab, else ``<image>\\t<caption>``
      lines (a Flickr ``#<n>`` suffix on the image is dropped).

    An optional ``split`` column / field lets one file hold several splits.

    Args:
        path: the file.
        image_root: the folder image paths are relative to (default: the file's folder).
        split: keep only rows whose ``split`` is this (``val`` and ``dev`` are the same);
            ``None`` keeps every row. Asking for a split from a file without a split column
            is an error, so train and test are never silently the same rows.
    """
    path = Path(path)
    lines = read_lines(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows, has_split = parse_jsonl_pairs(path, lines)
    elif suffix == ".csv":
        rows, has_split = _pairs_from_csv(path, lines)
    elif suffix in (".txt", ".tsv"):
        first = next((ln for ln in lines if ln.strip()), "")
        rows, has_split = (_pairs_from_tsv if "\t" in first else _pairs_from_csv)(path, lines)
    else:
        raise DataFormatError(path, "unknown pairs format (use .csv, .jsonl, .txt or .tsv)")
    if not rows:
        raise DataFormatError(path, "no (image, caption) rows")
    if split is not None:
        rows = [rows[i] for i in rows_of_split(path, [r[2] for r in rows], split, has_split)]
    root = Path(image_root) if image_root is not None else path.parent
    name = f"{path.name}/{canonical_split(split)}" if split is not None else path.name
    return group_pairs(name, [(_normalise_key(img), cap) for img, cap, _, _ in rows], root)


# --------------------------------------------------------------------------------------------
# Layout detection
# --------------------------------------------------------------------------------------------

_PAIRS_NAMES = ("captions.csv", "captions.jsonl", "captions.txt", "captions.tsv")


def open_split(path: str | os.PathLike, split: str | None = None, **kwargs) -> CaptionSplit:
    """Opens a split, guessing the layout from ``path``.

    - a folder with ``Flickr8k_text/`` → :func:`read_flickr8k`;
    - a ``.json`` file → :func:`read_karpathy_json` (images under the JSON's folder unless
      ``image_root=`` is passed);
    - a folder with ``*_ims.npy`` (or ``precomp/*_ims.npy``), or a ``<split>_ims.npy`` file →
      :func:`read_precomp`;
    - a ``.csv``/``.jsonl``/``.tsv``/``.txt`` file, or a folder of images with a
      ``captions.{csv,jsonl,txt,tsv}`` inside → :func:`read_pairs_file`;
    - a video dataset (MSR-VTT / VaTeX JSON, or ``video,caption`` pairs, with frame features)
      → :func:`vseinf.data.video_datasets.open_video_split`.

    Args:
        path: the file or folder.
        split: the split to read; required for Flickr8k, Karpathy JSON and precomp; for pair
            files ``None`` means every row.
        **kwargs: passed to the reader (e.g. ``image_root``, ``restval_into_train``).
    """
    p = Path(path)
    if not p.exists():
        raise DataFormatError(p, "no such file or folder")
    if is_video_dataset(p):  # MSR-VTT / VaTeX JSON, or video,caption pairs + frame features
        return open_video_split(p, split, **kwargs)

    def need_split(kind: str) -> str:
        if split is None:
            raise ValueError(f"{p}: a {kind} dataset needs a split (e.g. train, dev, test)")
        return split

    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".json":
            return read_karpathy_json(p, kwargs.pop("image_root", None),
                                      need_split("Karpathy JSON"), **kwargs)
        if p.name.endswith("_ims.npy"):
            return read_precomp(p.parent, split or p.name[: -len("_ims.npy")], **kwargs)
        if suffix in (".csv", ".jsonl", ".txt", ".tsv"):
            return read_pairs_file(p, split=split, **kwargs)
        raise DataFormatError(p, "unknown file type (expected .json, .csv, .jsonl, .txt, .tsv "
                                 "or <split>_ims.npy)")
    if (p / "Flickr8k_text").is_dir():
        return read_flickr8k(p, need_split("Flickr8k"), **kwargs)
    if any(p.glob("*_ims.npy")) or any((p / "precomp").glob("*_ims.npy")):
        return read_precomp(p, need_split("precomp"), **kwargs)
    for name in _PAIRS_NAMES:
        if (p / name).is_file():
            return read_pairs_file(p / name, split=split, **kwargs)
    raise DataFormatError(p, "cannot tell the layout: expected Flickr8k_text/, *_ims.npy, "
                             "precomp/, or a captions.csv/.jsonl/.txt inside")


def resolve_data_path(path: str, source: str = "data.path") -> str:
    """``path`` made absolute (a run can then be evaluated or resumed from any folder); a path that
    does not exist is an error that shows both the path as given and where it was looked for."""
    full = Path(path).expanduser().resolve()
    if not full.exists():
        shown = path if str(full) == path else f"{path} (= {full})"
        raise FileNotFoundError(f"{source} {shown}: no such file or folder; pass --data DIR")
    return str(full)
