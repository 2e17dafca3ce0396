"""The record every caption-dataset reader returns, the error they raise, and what they share.

- :class:`CaptionSplit` — one split: images (files, ids or precomputed features) and captions
  grouped by image; :func:`group_pairs` builds one from (image, caption) pairs;
- :class:`DataFormatError` — a missing or malformed file, named with its line or field;
- :func:`read_text` / :func:`read_lines` — UTF-8 text files, errors by line;
- :func:`rows_of_split` — which rows of a file with a ``split`` column belong to a split.

The image readers (:mod:`vseinf.data.splits`), the video readers (:mod:`vseinf.data.video_datasets`) and
the JSONL pair parser (:mod:`vseinf.data.jsonl`) all build on this module, which imports none of
them.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


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


def group_pairs(name: str, pairs: Sequence[tuple[str, str]], image_root: Path | None,
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


def read_text(path: Path) -> str:
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


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (a BOM and Windows line ends are tolerated)."""
    text = read_text(path)
    # Split on "\n" only: str.splitlines() also breaks on characters such as U+0085 or U+2028
    # that do turn up inside captions, and would shift every later line number.
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return lines


# Split names differ between layouts ("dev" in Flickr8k and precomp, "val" in Karpathy's JSON).
_SPLIT_ALIASES = {"val": "dev", "valid": "dev", "validation": "dev"}


def canonical_split(split: str) -> str:
    s = str(split).strip().lower()
    return _SPLIT_ALIASES.get(s, s)


# The split names datasets use (after the aliases above). A row whose split is none of these, nor
# the split asked for, is most likely a typo ("trian") or a damaged cell: it would be in no split.
KNOWN_SPLITS = frozenset({"train", "dev", "test", "restval", "testall"})


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def rows_of_split(path: Path, splits: Sequence[str | None], split: str, has_column: bool,
                  canonical=canonical_split, what: str = "(image, caption)") -> list[int]:
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
