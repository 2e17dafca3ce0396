"""Caption datasets: one record (:class:`CaptionSplit`) and a reader for each layout users have.

Every reader returns the same record, so the rest of the library never cares where the
captions came from:

- :func:`read_flickr8k` — the Flickr8k distribution (``Flickr8k_text/`` + ``Flicker8k_Dataset/``);
- :func:`read_flickr_token_file` — any ``<image>#<n>\\t<caption>`` file (Flickr8k, Flickr30k);
- :func:`read_karpathy_json` — Karpathy's ``dataset_{coco,flickr30k,flickr8k}.json`` splits;
- :func:`read_precomp` — the SCAN / VSE++ "precomp" layout of precomputed region features;
- :func:`read_pairs_file` — a CSV / JSONL / TSV list of (image, caption) pairs;
- :func:`open_split` — guesses the layout from a path and calls one of the above.

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
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


class DataFormatError(ValueError):
    """A data file is missing or malformed; the message names the file and the line or field.

    Args:
        path: the offending file (or folder).
        message: what is wrong, in words.
        line: 1-based line number, when the format has lines.
        field: the offending field (e.g. ``images[3].sentences``), when it has fields.
    """

    def __init__(self, path: str | os.PathLike, message: str, *, line: int | None = None,
                 field: str | None = None) -> None:
        self.path = Path(path)
        self.line = line
        self.field = field
        where = str(path)
        if line is not None:
            where += f":{line}"
        if field is not None:
            where += f": field {field!r}"
        super().__init__(f"{where}: {message}")


# --------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------


@dataclass
class CaptionSplit:
    """One split of a caption dataset: images (as files or precomputed features) and captions.

    Args:
        name: a label for logs and reports, e.g. ``"flickr8k/train"``.
        image_keys: one entry per image: its file path relative to ``image_root``, or an id.
        image_root: the folder the keys are relative to; ``None`` for precomputed features.
        captions: every caption, grouped by image.
        caption_to_image: int64 ``[n_captions]``, the index into ``image_keys`` of each caption.
        features: precomputed features only: an ``N×R×D`` array, normally a read-only
            ``np.memmap`` (never loaded whole).
    """

    name: str
    image_keys: list[str]
    image_root: Path | None
    captions: list[str]
    caption_to_image: np.ndarray
    features: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.image_keys = list(self.image_keys)
        self.captions = list(self.captions)
        self.caption_to_image = np.asarray(self.caption_to_image, dtype=np.int64).reshape(-1)
        if self.image_root is not None:
            self.image_root = Path(self.image_root)
        n_images = len(self.image_keys)
        if len(self.caption_to_image) != len(self.captions):
            raise ValueError(f"{self.name}: {len(self.captions)} captions but "
                             f"{len(self.caption_to_image)} caption_to_image entries")
        if len(self.caption_to_image) and (self.caption_to_image.min() < 0
                                           or self.caption_to_image.max() >= n_images):
            raise ValueError(f"{self.name}: caption_to_image points outside the "
                             f"{n_images} images")
        counts = np.bincount(self.caption_to_image, minlength=n_images)
        if n_images and counts.min() == 0:
            first = int(np.argmin(counts))
            raise ValueError(f"{self.name}: image {self.image_keys[first]!r} has no caption "
                             "(readers drop such images; do the same when building a split)")
        if self.features is not None and len(self.features) != n_images:
            raise ValueError(f"{self.name}: {len(self.features)} feature rows for "
                             f"{n_images} images")

    @property
    def n_images(self) -> int:
        return len(self.image_keys)

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    @property
    def captions_per_image(self) -> np.ndarray:
        """int64 ``[n_images]``: how many captions each image has."""
        return np.bincount(self.caption_to_image, minlength=self.n_images)

    def caption_indices(self, image: int) -> np.ndarray:
        """The indices (into ``captions``) of image ``image``'s captions."""
        return np.flatnonzero(self.caption_to_image == image)

    def image_path(self, i: int) -> Path:
        """The file of image ``i``; a ``ValueError`` for precomputed-feature splits."""
        if self.image_root is None:
            raise ValueError(f"{self.name}: a split of precomputed features has no image files")
        return self.image_root / self.image_keys[i]

    def subset(self, image_indices: Iterable[int], name: str | None = None) -> CaptionSplit:
        """A split with only the given images (in the given order) and their captions.

        A contiguous ascending range keeps ``features`` memory-mapped; any other selection
        copies the selected feature rows into memory.
        """
        idx = np.asarray(list(image_indices), dtype=np.int64)
        if len(idx) and (idx.min() < -self.n_images or idx.max() >= self.n_images):
            raise IndexError(f"{self.name}: image index out of range for {self.n_images} images")
        idx = idx % max(self.n_images, 1)
        if len(np.unique(idx)) != len(idx):
            raise ValueError(f"{self.name}: subset() got repeated image indices")
        per_image = [self.caption_indices(int(i)) for i in idx] if len(idx) < 64 else None
        if per_image is None:  # one stable sort instead of a scan per image
            order = np.argsort(self.caption_to_image, kind="stable")
            starts = np.searchsorted(self.caption_to_image[order], np.arange(self.n_images + 1))
            per_image = [order[starts[i]:starts[i + 1]] for i in idx]
        captions, owners = [], []
        for new, caps in enumerate(per_image):
            captions.extend(self.captions[c] for c in caps)
            owners.extend([new] * len(caps))
        features = None
        if self.features is not None:
            contiguous = len(idx) > 0 and np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))
            features = (self.features[idx[0]:idx[0] + len(idx)] if contiguous
                        else np.asarray(self.features[idx]))
        return CaptionSplit(
            name=name or f"{self.name}[{len(idx)} images]",
            image_keys=[self.image_keys[i] for i in idx],
            image_root=self.image_root,
            captions=captions,
            caption_to_image=np.asarray(owners, dtype=np.int64),
            features=features,
        )


def _group(name: str, pairs: Sequence[tuple[str, str]], image_root: Path | None,
           image_order: Sequence[str] | None = None) -> CaptionSplit:
    """Builds a split from (image key, caption) pairs, grouping captions by image.

    Images are ordered by ``image_order`` when given (images in it without captions are
    dropped), else by first appearance.
    """
    by_image: dict[str, list[str]] = {}
    for key, caption in pairs:
        by_image.setdefault(key, []).append(caption)
    order = list(image_order) if image_order is not None else list(by_image)
    dropped = [k for k in order if k not in by_image]
    if dropped:
        log.warning("%s: dropped %d image(s) without captions, e.g. %s", name, len(dropped),
                    ", ".join(dropped[:3]))
    keys = [k for k in order if k in by_image]
    captions: list[str] = []
    owners: list[int] = []
    for i, key in enumerate(keys):
        captions.extend(by_image[key])
        owners.extend([i] * len(by_image[key]))
    return CaptionSplit(name=name, image_keys=keys, image_root=image_root, captions=captions,
                        caption_to_image=np.asarray(owners, dtype=np.int64))


def _read_text(path: Path) -> str:
    """A UTF-8 text file (a BOM is dropped); bytes that are not UTF-8 are reported by line."""
    if not path.is_file():
        raise DataFormatError(path, "file not found")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # A byte offset is no help in a text editor: give the line and the column within it.
        line_start = data.rfind(b"\n", 0, e.start) + 1
        column = len(data[line_start:e.start].decode("utf-8", errors="replace")) + 1
        raise DataFormatError(path, f"not UTF-8 text (byte 0x{data[e.start]:02x} in column {column}: "
                                    f"{e.reason}); save the file as UTF-8",
                              line=data.count(b"\n", 0, e.start) + 1) from None


def _read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (a BOM and Windows line ends are tolerated)."""
    text = _read_text(path)
    # Split on "\n" only: str.splitlines() also breaks on characters such as U+0085 or U+2028
    # that do turn up inside captions, and would shift every later line number.
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return lines


# Split names differ between layouts ("dev" in Flickr8k and precomp, "val" in Karpathy's JSON).
_SPLIT_ALIASES = {"val": "dev", "valid": "dev", "validation": "dev"}


def _canonical_split(split: str) -> str:
    s = str(split).strip().lower()
    return _SPLIT_ALIASES.get(s, s)


# The split names datasets use (after the aliases above). A row whose split is none of these, nor
# the split asked for, is most likely a typo ("trian") or a damaged cell: it would be in no split.
KNOWN_SPLITS = frozenset({"train", "dev", "test", "restval", "testall"})


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def rows_of_split(path: Path, splits: Sequence[str | None], split: str, has_column: bool,
                  canonical=_canonical_split, what: str = "(image, caption)") -> list[int]:
    """Which rows (indices) belong to ``split``, given each row's split value.

    Rows whose value names no known split are in none: a warning gives their count and values.

    Args:
        path: the file, for messages.
        splits: each row's split value (``None``: the row has none).
        split: the split asked for.
        has_column: whether the file has a split column / field at all (an error otherwise).
        canonical: maps a split value to its canonical name (aliases of "dev" …).
        what: what a row is, for messages.
    """
    if not has_column:
        raise DataFormatError(path, f"split {split!r} requested, but the file has no 'split' column; "
                                    "pass split=None to use every row", field="split")
    want = canonical(split)
    known = KNOWN_SPLITS | {want}
    unknown = Counter(v for v in splits if v is None or canonical(v) not in known)
    if unknown:
        shown = ", ".join(f"{'no split' if v is None else repr(v)} ({_plural(c, 'row')})"
                          for v, c in unknown.most_common(5))
        more = f", and {len(unknown) - 5} more values" if len(unknown) > 5 else ""
        log.warning("%s: %s left out of every split, for a split value that is none of %s: %s%s", path,
                    _plural(sum(unknown.values()), "row"), ", ".join(sorted(known)), shown, more)
    keep = [i for i, v in enumerate(splits) if v is not None and canonical(v) == want]
    if not keep:
        have = sorted({str(v) for v in splits if v is not None})
        raise DataFormatError(path, f"no {what} rows in split {split!r} (the file's split values: "
                                    f"{', '.join(have) or 'none'})")
    return keep


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
    for lineno, raw in enumerate(_read_lines(path), 1):
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
    for lineno, line in enumerate(_read_lines(token_path), 1):
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
    split = _group(name or token_path.name, pairs, root, order)
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
    s = _canonical_split(split)
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
        doc = json.loads(_read_text(json_path))
    except json.JSONDecodeError as e:
        raise DataFormatError(json_path, f"invalid JSON: {e.msg}", line=e.lineno) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DataFormatError(json_path, "expected an object with an 'images' list", field="images")
    wanted = {"dev": "val"}.get(_canonical_split(split), _canonical_split(split))
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
    split_rec = _group(f"{json_path.stem}/{wanted}", pairs, root, keys_in_order)
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
    s = _canonical_split(split)
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
    lines = _read_lines(caps_path)
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
    ids = [x.strip() for x in _read_lines(ids_path) if x.strip()] if ids_path.is_file() else None

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


def _pairs_from_jsonl(path: Path, lines: list[str]) -> tuple[list[tuple[str, str, str | None, int]], bool]:
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, f"invalid JSON ({e.msg})", line=lineno) from None
        if not isinstance(obj, dict):
            raise DataFormatError(path, "expected a JSON object", line=lineno)
        image = obj.get("image")
        if not isinstance(image, str) or not image.strip():
            raise DataFormatError(path, "missing or empty 'image' string", line=lineno)
        # One caption per row is the format; a list of captions on one row is accepted too.
        caps = obj.get("caption", obj.get("captions"))
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(caps, list) or not caps or not all(
                isinstance(c, str) and c.strip() for c in caps):
            raise DataFormatError(path, "missing or empty 'caption' (a string, or a list of "
                                        "strings)", line=lineno)
        split = obj.get("split")
        if split is not None and not isinstance(split, str):
            raise DataFormatError(path, "'split' must be a string", line=lineno)
        rows.extend((image.strip(), c.strip(), split, lineno) for c in caps)
    return rows, any(r[2] is not None for r in rows)


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
    lines = _read_lines(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows, has_split = _pairs_from_jsonl(path, lines)
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
    name = f"{path.name}/{_canonical_split(split)}" if split is not None else path.name
    return _group(name, [(_normalise_key(img), cap) for img, cap, _, _ in rows], root)


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
      → :func:`vseinf.data.video.open_video_split`.

    Args:
        path: the file or folder.
        split: the split to read; required for Flickr8k, Karpathy JSON and precomp; for pair
            files ``None`` means every row.
        **kwargs: passed to the reader (e.g. ``image_root``, ``restval_into_train``).
    """
    p = Path(path)
    if not p.exists():
        raise DataFormatError(p, "no such file or folder")
    from .video import is_video_dataset, open_video_split  # here: video imports this module

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
