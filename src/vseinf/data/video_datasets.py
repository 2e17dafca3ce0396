"""Video datasets: captions from MSR-VTT, VaTeX or a pairs file, frame features read lazily.

A video is a *set* of frame features whose size varies from clip to clip (docs/recipe.md §1, §6): exactly
what GPO pools. A video split is a :class:`VideoSplit` — a :class:`~vseinf.data.CaptionSplit`
whose "images" are videos (``image_keys`` are video ids, ``image_root`` is ``None``) with a
``feature_source`` that reads each clip's ``T × D`` frame features when asked:

- :class:`NpyFrameFolder` — a folder of ``<video_id>.npy`` files, one ``T × D`` array each;
- :class:`H5Frames` — one HDF5 file with a ``T × D`` dataset per video id.

Both only look at array headers when opened and read the frames of a batch when asked, so a
dataset never has to fit in memory. A clip whose file is missing or malformed (wrong rank, other
width, empty, non-numeric, non-finite values) is reported by name and marked ``broken``: training
and evaluation skip it; it never stops a run.

Caption readers (any number of captions per video):

- :func:`read_msrvtt` — ``MSRVTT_data.json`` (``videos[]{video_id, split}``,
  ``sentences[]{video_id, caption}``), with the split lists people use: the 9k / 7k training lists
  (a text file of ids or a CSV with a ``video_id`` column) and the 1K-A test CSV
  (``key,vid_key,video_id,sentence``);
- :func:`read_vatex` — VaTeX JSON (a list of ``{videoID, enCap: [...]}``);
- :func:`read_video_pairs` — a CSV / JSONL of ``video,caption`` rows (optional ``split`` column).

:func:`open_video_split` finds the captions and the features in a dataset folder;
:func:`vseinf.data.open_split` calls it when :func:`is_video_dataset` says a path is one.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from .jsonl import parse_jsonl_pairs
from .records import (
    CaptionSplit,
    DataFormatError,
    group_pairs,
    read_lines,
    rows_of_split,
)

log = logging.getLogger(__name__)

__all__ = [
    "FrameFeatures",
    "H5Frames",
    "NpyFrameFolder",
    "VideoSplit",
    "find_frame_features",
    "is_video_dataset",
    "open_frame_features",
    "open_video_split",
    "read_id_list",
    "read_msrvtt",
    "read_vatex",
    "read_video_pairs",
]

# Every "validation" spelling is one split: MSR-VTT's JSON says "validate", VaTeX's files say
# "validation", Flickr8k and precomp say "dev", Karpathy's JSON says "val".
_VAL_NAMES = {"val", "valid", "validate", "validation", "dev"}


def _canon(split: str) -> str:
    s = str(split).strip().lower()
    return "dev" if s in _VAL_NAMES else s


# --------------------------------------------------------------------------------------------
# Frame-feature sources
# --------------------------------------------------------------------------------------------


class FrameFeatures:
    """Per-video frame features, read lazily; the common part of the concrete sources.

    Subclasses fill ``video_ids``, ``lengths`` (frames per clip, 0 when broken), ``broken``,
    ``problems`` (video id → what is wrong) and ``dim``, and implement :meth:`_read`.

    Every source offers ``len()``, ``dim``, ``broken`` and ``batch(indices) -> (B × Tmax × D
    float32 tensor, lengths)``, the interface of the training loop's feature sources.
    """

    video_ids: list[str]
    lengths: np.ndarray
    broken: np.ndarray
    problems: dict[str, str]
    dim: int
    where: str

    def __len__(self) -> int:
        return len(self.video_ids)

    def _read(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def _mark_broken(self, i: int, reason: str) -> None:
        vid = self.video_ids[i]
        if not self.broken[i]:
            log.warning("%s: video %r: %s; it is skipped", self.where, vid, reason)
        self.broken[i] = True
        self.problems[vid] = reason

    def read(self, i: int) -> np.ndarray | None:
        """Clip ``i``'s frames as a float32 ``T × D`` array, or ``None`` if it is broken.

        A file that passed the checks at opening but fails now (unreadable bytes, NaN or inf
        values) is marked broken here, with a warning naming it.
        """
        i = int(i)
        if self.broken[i]:
            return None
        try:
            x = np.asarray(self._read(i), dtype=np.float32)
        except (OSError, ValueError, KeyError) as e:
            self._mark_broken(i, f"unreadable ({e})")
            return None
        if x.shape != (self.lengths[i], self.dim):
            self._mark_broken(i, f"shape {x.shape}, expected ({self.lengths[i]}, {self.dim})")
            return None
        if not np.isfinite(x).all():
            self._mark_broken(i, "non-finite values (NaN or inf) in its frame features")
            return None
        return x

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips as a zero-padded float32 batch ``B × Tmax × D`` and their frame counts (Long).

        A broken clip comes back as one zero frame (length 1), so that pooling stays finite;
        its ``broken`` flag tells callers to leave it out.
        """
        idx = [int(i) for i in np.asarray(indices).reshape(-1)]
        frames = [self.read(i) for i in idx]
        lengths = np.array([1 if f is None else len(f) for f in frames], dtype=np.int64)
        out = np.zeros((len(idx), int(lengths.max(initial=1)), self.dim), dtype=np.float32)
        for b, f in enumerate(frames):
            if f is not None:
                out[b, :len(f)] = f
        return torch.from_numpy(out), torch.from_numpy(lengths)

    def batch_reference(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """The slow, obviously-right twin of :meth:`batch`: each file loaded whole, padded by torch."""
        items = []
        for i in indices:
            x = None if self.broken[int(i)] else self.read(int(i))
            items.append(torch.zeros(1, self.dim) if x is None else torch.tensor(x))
        lengths = torch.tensor([len(t) for t in items], dtype=torch.long)
        return torch.nn.utils.rnn.pad_sequence(items, batch_first=True), lengths

    def subset(self, indices: Iterable[int]) -> FrameFeatures:
        """The same source restricted to (and reordered as) ``indices``; nothing is re-read."""
        idx = np.asarray(list(indices), dtype=np.int64)
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.video_ids = [self.video_ids[i] for i in idx]
        new.lengths = self.lengths[idx].copy()
        new.broken = self.broken[idx].copy()
        new.problems = {v: self.problems[v] for v in new.video_ids if v in self.problems}
        new._extra_subset(idx)
        return new

    def _extra_subset(self, idx: np.ndarray) -> None:
        """Hook for subclasses holding more per-video state."""

    def report(self, limit: int = 10) -> str:
        """One line: how many clips are broken, naming the first ``limit`` with their reasons."""
        bad = [v for v, b in zip(self.video_ids, self.broken) if b]
        if not bad:
            return f"{self.where}: all {len(self)} clips have frame features"
        shown = "; ".join(f"{v}: {self.problems.get(v, '?')}" for v in bad[:limit])
        more = f"; … {len(bad) - limit} more" if len(bad) > limit else ""
        return f"{self.where}: {len(bad)} of {len(self)} clips skipped ({shown}{more})"

    def _finish_scan(self, shapes: list[tuple | None], dim: int | None) -> None:
        """Fix ``dim`` (given, or the most common width) and mark clips that disagree as broken."""
        n = len(self.video_ids)
        self.lengths = np.zeros(n, dtype=np.int64)
        self.broken = np.zeros(n, dtype=bool)
        self.problems = dict(getattr(self, "problems", {}))
        widths = Counter(s[1] for s in shapes if s is not None and len(s) == 2 and s[0] > 0)
        if dim is None:
            if not widths:
                dim = 0
            else:
                dim = widths.most_common(1)[0][0]
        self.dim = int(dim)
        for i, (vid, shape) in enumerate(zip(self.video_ids, shapes)):
            reason = self.problems.get(vid)
            if reason is None and shape is not None:
                if len(shape) != 2:
                    reason = f"expected a T×D array of frame features, got shape {tuple(shape)}"
                elif shape[0] == 0:
                    reason = "no frames (T = 0)"
                elif shape[1] != self.dim:
                    reason = f"{shape[1]}-d frames, the other clips have {self.dim}-d"
            if reason is not None:
                self.broken[i] = True
                self.problems[vid] = reason
            else:
                self.lengths[i] = shape[0]
        if self.broken.any():
            log.warning("%s", self.report())
        if n and self.broken.all():
            raise DataFormatError(self.where, "no clip has usable frame features: "
                                  + self.report(limit=3))


def _numeric(dtype: np.dtype) -> bool:
    return dtype.kind in "fiu"  # floats and integers convert to float32; bool, complex, str do not


class NpyFrameFolder(FrameFeatures):
    """Frame features as one ``<video_id>.npy`` file per clip (``T × D``; T may vary).

    Opening reads only the ``.npy`` headers (memory-mapping checks that each file is as long as
    its header says); :meth:`batch` loads just the clips it is asked for.

    Args:
        folder: the folder of ``.npy`` files.
        video_ids: the clips, in split order (``None``: every ``*.npy`` in the folder, sorted).
        dim: the frame feature size D; ``None`` takes the most common one, and clips with
            another width are marked broken.
    """

    def __init__(self, folder: str | os.PathLike, video_ids: Sequence[str] | None = None,
                 dim: int | None = None) -> None:
        self.folder = Path(folder)
        self.where = str(self.folder)
        if not self.folder.is_dir():
            raise DataFormatError(self.folder, "frame-feature folder not found")
        if video_ids is None:
            video_ids = sorted(p.stem for p in self.folder.glob("*.npy"))
            if not video_ids:
                raise DataFormatError(self.folder, "no <video_id>.npy files in the folder")
        self.video_ids = [str(v) for v in video_ids]
        self.problems = {}
        shapes: list[tuple | None] = []
        for vid in self.video_ids:
            path = self.path(vid)
            if not path.is_file():
                self.problems[vid] = f"{path.name} not found"
                shapes.append(None)
                continue
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                # Truncated files, pickled objects, text renamed to .npy, …
                self.problems[vid] = f"{path.name} is not a readable .npy array ({e})"
                shapes.append(None)
                continue
            if not _numeric(arr.dtype):
                self.problems[vid] = f"{path.name} holds {arr.dtype}, not numbers"
                shapes.append(None)
            else:
                shapes.append(tuple(arr.shape))
            del arr
        self._finish_scan(shapes, dim)

    def path(self, video_id: str) -> Path:
        return self.folder / f"{video_id}.npy"

    def _read(self, i: int) -> np.ndarray:
        return np.load(self.path(self.video_ids[i]), allow_pickle=False)


class H5Frames(FrameFeatures):
    """Frame features in one HDF5 file: a ``T × D`` dataset per video id (needs ``h5py``).

    Opening reads only dataset shapes; :meth:`batch` reads the clips it is asked for. The file
    handle is opened on first use in each process (HDF5 handles do not survive a fork).

    Args:
        path: the ``.h5`` / ``.hdf5`` file.
        video_ids: the clips, in split order (``None``: every top-level dataset, sorted).
        dim: the frame feature size D (``None``: the most common one).
    """

    def __init__(self, path: str | os.PathLike, video_ids: Sequence[str] | None = None,
                 dim: int | None = None) -> None:
        h5py = _import_h5py()
        self.path = Path(path)
        self.where = str(self.path)
        self._handle = None
        self._pid = None
        try:
            f = h5py.File(self.path, "r")
        except OSError as e:
            raise DataFormatError(self.path, f"not a readable HDF5 file ({e})") from None
        with f:
            if video_ids is None:
                video_ids = sorted(k for k in f.keys() if isinstance(f[k], h5py.Dataset))
                if not video_ids:
                    raise DataFormatError(self.path, "no datasets at the top level of the file")
            self.video_ids = [str(v) for v in video_ids]
            self.problems = {}
            shapes: list[tuple | None] = []
            for vid in self.video_ids:
                node = f.get(vid)
                if node is None:
                    self.problems[vid] = f"no dataset {vid!r} in {self.path.name}"
                    shapes.append(None)
                elif not isinstance(node, h5py.Dataset):
                    self.problems[vid] = f"{vid!r} in {self.path.name} is a group, not an array"
                    shapes.append(None)
                elif not _numeric(node.dtype):
                    self.problems[vid] = f"{vid!r} in {self.path.name} holds {node.dtype}, not numbers"
                    shapes.append(None)
                else:
                    shapes.append(tuple(node.shape))
        self._finish_scan(shapes, dim)

    def _file(self):
        if self._handle is None or self._pid != os.getpid():
            self._handle = _import_h5py().File(self.path, "r")
            self._pid = os.getpid()
        return self._handle

    def _read(self, i: int) -> np.ndarray:
        return self._file()[self.video_ids[i]][()]

    def __getstate__(self):  # picklable for DataLoader workers: the handle is reopened there
        state = dict(self.__dict__)
        state["_handle"], state["_pid"] = None, None
        return state


def _import_h5py():
    try:
        import h5py
    except ImportError:
        raise ValueError("reading HDF5 frame features needs h5py (pip install h5py, or "
                         "pip install 'vseinf[video]')") from None
    return h5py


_H5_SUFFIXES = (".h5", ".hdf5", ".hdf")


def open_frame_features(path: str | os.PathLike, video_ids: Sequence[str] | None = None,
                        dim: int | None = None) -> FrameFeatures:
    """A frame-feature source for a folder of ``<video_id>.npy`` files or an HDF5 file.

    Args:
        path: the folder or the ``.h5`` / ``.hdf5`` file.
        video_ids: the clips wanted, in order (``None``: everything there).
        dim: the feature size, if known (clips of another width are marked broken).
    """
    p = Path(path)
    if p.is_file() and p.suffix.lower() in _H5_SUFFIXES:
        return H5Frames(p, video_ids, dim)
    if p.is_dir():
        return NpyFrameFolder(p, video_ids, dim)
    raise DataFormatError(p, "expected a folder of <video_id>.npy files or an .h5/.hdf5 file")


def find_frame_features(folder: str | os.PathLike) -> Path | None:
    """Where a dataset folder keeps its frame features, or ``None``.

    Looked for, in order: a ``features/`` folder; a single ``*.h5`` / ``*.hdf5`` file (a
    ``features.h5`` wins when there are several); ``.npy`` files in the folder itself.
    """
    folder = Path(folder)
    if (folder / "features").is_dir():
        return folder / "features"
    h5 = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _H5_SUFFIXES)
    named = [p for p in h5 if p.stem.lower() == "features"]
    if named:
        return named[0]
    if len(h5) == 1:
        return h5[0]
    if len(h5) > 1:
        raise DataFormatError(folder, "several HDF5 files ({}); name the frame features "
                              "features.h5 or pass features=".format(", ".join(p.name for p in h5)))
    if any(folder.glob("*.npy")):
        return folder
    return None


# --------------------------------------------------------------------------------------------
# The split record
# --------------------------------------------------------------------------------------------


@dataclass
class VideoSplit(CaptionSplit):
    """A :class:`CaptionSplit` of videos: ``image_keys`` are video ids, features come from
    ``feature_source`` (one ``T × D`` set per video), ``image_root`` is ``None``.

    Args:
        feature_source: a :class:`FrameFeatures` whose clips are ``image_keys``, in order.
    """

    feature_source: FrameFeatures | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        src = self.feature_source
        if src is not None and list(src.video_ids) != list(self.image_keys):
            raise ValueError(f"{self.name}: the feature source's clips do not match the split's "
                             "videos")

    def subset(self, image_indices: Iterable[int], name: str | None = None) -> VideoSplit:
        idx = [int(i) for i in image_indices]
        base = super().subset(idx, name)
        norm = [i % max(self.n_images, 1) for i in idx]
        source = self.feature_source.subset(norm) if self.feature_source is not None else None
        values = {f.name: getattr(base, f.name) for f in fields(CaptionSplit)}
        return VideoSplit(**values, feature_source=source)


def _video_split(name: str, pairs: Sequence[tuple[str, str]], order: Sequence[str] | None,
                 features: str | os.PathLike | FrameFeatures | None, dim: int | None,
                 origin: Path) -> VideoSplit:
    """Groups (video, caption) pairs and attaches the frame features of the resulting videos."""
    grouped = group_pairs(name, pairs, None, order)
    if grouped.n_images == 0:
        raise DataFormatError(origin, f"{name}: no video with a caption")
    source = None
    if isinstance(features, FrameFeatures):
        if features.video_ids != grouped.image_keys:
            where = {v: i for i, v in enumerate(features.video_ids)}
            missing = [v for v in grouped.image_keys if v not in where]
            if missing:
                raise DataFormatError(features.where, f"{name}: {len(missing)} video(s) of the "
                                      f"split are not in this feature source, e.g. {missing[0]!r}")
            features = features.subset([where[v] for v in grouped.image_keys])
        source = features
    elif features is not None:
        source = open_frame_features(features, grouped.image_keys, dim)
    values = {f.name: getattr(grouped, f.name) for f in fields(CaptionSplit)}
    return VideoSplit(**values, feature_source=source)


# --------------------------------------------------------------------------------------------
# MSR-VTT
# --------------------------------------------------------------------------------------------

# File names the community split lists go by (CLIP4Clip's CSVs, Collaborative Experts' lists).
_MSRVTT_LISTS = {
    "train9k": ("MSRVTT_train.9k.csv", "train_list_jsfusion.txt", "train_9k.txt"),
    "train7k": ("MSRVTT_train.7k.csv", "train_list_miech.txt", "train_7k.txt"),
    "test1k": ("MSRVTT_JSFUSION_test.csv", "val_list_jsfusion.txt", "test_1k.txt"),
}
_LIST_ALIASES = {"9k": "train9k", "train_9k": "train9k", "train9k": "train9k",
                 "7k": "train7k", "train_7k": "train7k", "train7k": "train7k",
                 "1k": "test1k", "1k-a": "test1k", "1ka": "test1k", "test1k": "test1k",
                 "test_1k": "test1k", "jsfusion": "test1k"}
_VIDEO_COLUMNS = ("video_id", "video", "videoid", "vid", "clip", "clip_id")
_CAPTION_COLUMNS = ("caption", "sentence", "text", "encap")


def _pick(header: Sequence[str], choices: Sequence[str]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    return next((lowered.index(c) for c in choices if c in lowered), None)


def _csv_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the non-blank rows (with their line numbers) of a CSV file."""
    lines = read_lines(path)
    reader = csv.reader([ln + "\n" for ln in lines])
    try:
        header = next(reader)
        rows = []
        line = reader.line_num
        for row in reader:
            start, line = line + 1, reader.line_num
            if row and any(c.strip() for c in row):
                rows.append((start, row))
    except StopIteration:
        raise DataFormatError(path, "empty file") from None
    except csv.Error as e:
        raise DataFormatError(path, f"malformed CSV ({e})", line=reader.line_num) from None
    return header, rows


def read_id_list(path: str | os.PathLike) -> tuple[list[str], list[tuple[str, str]] | None]:
    """Reads a split list: video ids, and (video, sentence) pairs when the file carries them.

    Formats: a text file with one video id a line; a CSV with a ``video_id`` column (MSR-VTT's
    ``MSRVTT_train.9k.csv``); a CSV that also has a ``sentence`` / ``caption`` column (the 1K-A
    test file ``key,vid_key,video_id,sentence``), whose sentences are then the captions.

    Returns:
        (ids in file order without repeats, pairs or ``None``).
    """
    path = Path(path)
    first = next((ln for ln in read_lines(path) if ln.strip()), "")
    if path.suffix.lower() != ".csv" and "," not in first:
        ids = [ln.strip() for ln in read_lines(path) if ln.strip()]
        if not ids:
            raise DataFormatError(path, "no video ids in file")
        return list(dict.fromkeys(ids)), None
    header, rows = _csv_rows(path)
    vi = _pick(header, _VIDEO_COLUMNS)
    if vi is None:
        raise DataFormatError(path, f"the header {header!r} has no 'video_id' column", line=1)
    ci = _pick(header, _CAPTION_COLUMNS)
    ids, pairs = [], []
    for line, row in rows:
        if len(row) != len(header):
            raise DataFormatError(path, f"{len(row)} columns, the header has {len(header)}", line=line)
        vid = row[vi].strip()
        if not vid:
            raise DataFormatError(path, "empty video id", line=line)
        ids.append(vid)
        if ci is not None:
            caption = row[ci].strip()
            if not caption:
                raise DataFormatError(path, f"empty sentence for {vid!r}", line=line)
            pairs.append((vid, caption))
    if not ids:
        raise DataFormatError(path, "no rows")
    return list(dict.fromkeys(ids)), (pairs if ci is not None else None)


def _load_json(path: Path):
    if not path.is_file():
        raise DataFormatError(path, "file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataFormatError(path, f"invalid JSON ({e.msg})", line=e.lineno) from None
    except UnicodeDecodeError as e:
        raise DataFormatError(path, f"not UTF-8 text ({e.reason})") from None


def _msrvtt_list_file(folder: Path, split: str) -> Path | None:
    """The list file a split name refers to: a path, a file in ``folder``, or a known alias."""
    candidate = Path(split)
    # Only names that look like files are files: a stray file called "train" must not
    # turn the JSON's train split into a list.
    if candidate.suffix.lower() in (".txt", ".csv") or len(candidate.parts) > 1:
        for p in (candidate, folder / candidate):
            if p.is_file():
                return p
        raise DataFormatError(candidate, "split list file not found (looked here and in "
                                         f"{folder})")
    alias = _LIST_ALIASES.get(split.strip().lower())
    if alias is None:
        return None
    for name in _MSRVTT_LISTS[alias]:
        if (folder / name).is_file():
            return folder / name
    raise DataFormatError(folder, f"split {split!r} needs one of these list files here: "
                                  + ", ".join(_MSRVTT_LISTS[alias]))


def read_msrvtt(json_path: str | os.PathLike, split: str | None,
                features: str | os.PathLike | FrameFeatures | None = None,
                dim: int | None = None) -> VideoSplit:
    """Reads one split of MSR-VTT (``MSRVTT_data.json``); any number of captions per video.

    Args:
        json_path: ``MSRVTT_data.json``: ``videos[]`` with ``video_id`` and ``split``, and
            ``sentences[]`` with ``video_id`` and ``caption``.
        split: one of the JSON's ``split`` values (``train``, ``validate``/``val``/``dev``,
            ``test``); or a split list: a file path (or a file name beside the JSON) of video
            ids / a CSV with ``video_id`` (captions then come from the JSON) or with
            ``video_id`` and ``sentence`` (those sentences are the captions: the 1K-A test CSV);
            or an alias of the usual lists: ``train9k``, ``train7k``, ``test1k``. ``None``: all
            videos.
        features: a frame-feature folder / HDF5 file / source; ``None``: no features attached
            (captions only).
        dim: the frame feature size, if known.
    """
    json_path = Path(json_path)
    data = _load_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
        raise DataFormatError(json_path, "expected an object with a 'sentences' list "
                                         "(MSR-VTT's MSRVTT_data.json)", field="sentences")
    pairs: list[tuple[str, str]] = []
    for k, s in enumerate(data["sentences"]):
        if not isinstance(s, dict) or not isinstance(s.get("video_id"), str) \
                or not isinstance(s.get("caption"), str):
            raise DataFormatError(json_path, "expected {video_id: str, caption: str}",
                                  field=f"sentences[{k}]")
        if s["caption"].strip():
            pairs.append((s["video_id"].strip(), s["caption"].strip()))
    videos = data.get("videos")
    if videos is not None and not isinstance(videos, list):
        raise DataFormatError(json_path, "expected a list", field="videos")
    video_split: dict[str, str] = {}
    for k, v in enumerate(videos or []):
        if not isinstance(v, dict) or not isinstance(v.get("video_id"), str):
            raise DataFormatError(json_path, "expected {video_id: str, split: str}",
                                  field=f"videos[{k}]")
        video_split[v["video_id"].strip()] = str(v.get("split", ""))

    order: list[str] | None = None
    label = "all"
    if split is not None:
        list_file = _msrvtt_list_file(json_path.parent, split)
        if list_file is not None:
            order, own_pairs = read_id_list(list_file)
            label = list_file.stem
            if own_pairs is not None:
                pairs = own_pairs
        else:
            if not video_split:
                raise DataFormatError(json_path, f"split {split!r} requested, but the file has no "
                                                 "videos[].split", field="videos")
            want = _canon(split)
            order = [v for v, s in video_split.items() if _canon(s) == want]
            label = str(split).strip().lower()
            if not order:
                have = sorted({s for s in video_split.values()})
                raise DataFormatError(json_path, f"no video in split {split!r}; the file's splits "
                                                 f"are: {', '.join(have)}", field="videos[].split")
        wanted = set(order)
        pairs = [p for p in pairs if p[0] in wanted]
    elif video_split:
        order = list(video_split)
    return _video_split(f"msrvtt/{label}", pairs, order, features, dim, json_path)


# --------------------------------------------------------------------------------------------
# VaTeX
# --------------------------------------------------------------------------------------------


def read_vatex(json_path: str | os.PathLike,
               features: str | os.PathLike | FrameFeatures | None = None,
               dim: int | None = None) -> VideoSplit:
    """Reads a VaTeX annotation file: a list of ``{videoID, enCap: [captions]}`` (one split).

    Args:
        json_path: e.g. ``vatex_training_v1.0.json``, ``vatex_validation_v1.0.json``.
        features: frame-feature folder / HDF5 file keyed by ``videoID`` (or a source).
        dim: the frame feature size, if known.
    """
    json_path = Path(json_path)
    data = _load_json(json_path)
    if not isinstance(data, list):
        raise DataFormatError(json_path, "expected a list of {videoID, enCap} objects")
    pairs: list[tuple[str, str]] = []
    for k, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("videoID"), str):
            raise DataFormatError(json_path, "expected an object with a 'videoID' string",
                                  field=f"[{k}].videoID")
        caps = item.get("enCap")
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise DataFormatError(json_path, "expected a list of English captions "
                                             "(the private test set has none)", field=f"[{k}].enCap")
        pairs.extend((item["videoID"].strip(), c.strip()) for c in caps if c.strip())
    return _video_split(f"vatex/{json_path.stem}", pairs, None, features, dim, json_path)


# Words in VaTeX's file names for each split (vatex_training_v1.0.json, vatex_validation_v1.0.json,
# vatex_public_test_english_v1.1.json).
_VATEX_WORDS = {"train": ("train",), "dev": ("val",), "test": ("test",)}


def _vatex_file(folder: Path, split: str) -> Path:
    files = sorted(p for p in folder.glob("*.json") if "vatex" in p.name.lower())
    words = _VATEX_WORDS.get(_canon(split))
    if words is None:
        raise ValueError(f"{folder}: unknown VaTeX split {split!r} (use train, val or test)")
    match = [p for p in files if any(w in p.name.lower() for w in words)]
    if len(match) != 1:
        raise DataFormatError(folder, f"expected one VaTeX file for split {split!r} (a name with "
                                      f"{'/'.join(words)!r}), found: "
                                      + (", ".join(p.name for p in match) or "none"))
    return match[0]


# --------------------------------------------------------------------------------------------
# video,caption pair files
# --------------------------------------------------------------------------------------------


def read_video_pairs(path: str | os.PathLike, split: str | None = None,
                     features: str | os.PathLike | FrameFeatures | None = None,
                     dim: int | None = None) -> VideoSplit:
    """Reads (video, caption) rows from a CSV or JSONL file; a video may have many rows.

    - ``.csv``: a header with a video column (``video``, ``video_id``, …) and a caption column
      (``caption``, ``sentence``, ``text``); optional ``split``;
    - ``.jsonl``: one ``{"video": ..., "caption": ...}`` a line (``caption`` may be a list;
      ``video_id`` and ``captions`` are accepted too), optional ``"split"``.

    Args:
        path: the file.
        split: keep only rows of this split (``val``/``validate``/``dev`` are the same);
            ``None`` keeps every row. Asking for a split from a file without a split column is
            an error, so train and test are never silently the same rows.
        features: frame-feature folder / HDF5 file / source.
        dim: the frame feature size, if known.
    """
    path = Path(path)
    rows: list[tuple[str, str, str | None]] = []
    has_split, below = False, ""
    if path.suffix.lower() == ".jsonl":
        pairs, has_split = parse_jsonl_pairs(path, read_lines(path), ("video", "video_id"))
        rows = [(video, caption, s) for video, caption, s, _ in pairs]
    elif path.suffix.lower() in (".csv", ".txt"):
        header, csv_rows = _csv_rows(path)
        vi, ci = _pick(header, _VIDEO_COLUMNS), _pick(header, _CAPTION_COLUMNS)
        si = _pick(header, ("split",))
        if vi is None or ci is None:
            raise DataFormatError(path, f"the header {header!r} needs a 'video' and a 'caption' "
                                        "column", line=1)
        for line, row in csv_rows:
            if len(row) != len(header):
                raise DataFormatError(path, f"{len(row)} columns, the header has {len(header)}",
                                      line=line)
            vid, caption = row[vi].strip(), row[ci].strip()
            if not vid or not caption:
                raise DataFormatError(path, "empty video or caption", line=line)
            rows.append((vid, caption, row[si].strip() if si is not None else None))
        has_split, below = si is not None, " below the header"
    else:
        raise DataFormatError(path, "unknown video pairs format (use .csv or .jsonl)")
    if not rows:
        raise DataFormatError(path, "no (video, caption) rows" + below)
    if split is not None:
        rows = [rows[i] for i in rows_of_split(path, [r[2] for r in rows], split, has_split, _canon,
                                               "(video, caption)")]
    name = f"{path.stem}/{_canon(split)}" if split is not None else path.stem
    return _video_split(name, [(v, c) for v, c, _ in rows], None, features, dim, path)


# --------------------------------------------------------------------------------------------
# Layout detection
# --------------------------------------------------------------------------------------------

_PAIRS_NAMES = ("captions.csv", "captions.jsonl")


def _head(path: Path, n: int = 65536) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(n).decode("utf-8", errors="ignore")
    except OSError:
        return ""


def _json_kind(path: Path) -> str | None:
    """'msrvtt', 'vatex' or None, from the file name or the first bytes (no full parse)."""
    name = path.name.lower()
    if "msrvtt" in name:
        return "msrvtt"
    if "vatex" in name:
        return "vatex"
    head = _head(path)
    if '"videoID"' in head and '"enCap"' in head:
        return "vatex"
    if '"video_id"' in head and ('"sentences"' in head or '"videos"' in head):
        return "msrvtt"
    return None


def _has_video_column(path: Path) -> bool:
    """Whether a CSV's header / a JSONL's first record names a video (and not an image)."""
    first = next((ln for ln in _head(path, 8192).splitlines() if ln.strip()), "")
    if path.suffix.lower() == ".jsonl":
        try:
            obj = json.loads(first)
        except json.JSONDecodeError:
            return False
        return isinstance(obj, dict) and ("video" in obj or "video_id" in obj) and "image" not in obj
    header = next(csv.reader([first]), [])
    return _pick(header, _VIDEO_COLUMNS) is not None and _pick(header, ("image", "filename")) is None


def _captions_in(folder: Path) -> tuple[str, Path] | None:
    """The caption file of a video dataset folder and its kind."""
    for p in sorted(folder.glob("*.json")):
        if p.name == "MSRVTT_data.json" or _json_kind(p) == "msrvtt":
            return "msrvtt", p
    if any(_json_kind(p) == "vatex" for p in folder.glob("*.json")):
        return "vatex", folder
    for name in _PAIRS_NAMES:
        if (folder / name).is_file() and _has_video_column(folder / name):
            return "pairs", folder / name
    return None


def is_video_dataset(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a video dataset (a cheap look at names and first bytes; never raises).

    Folders: an MSR-VTT or VaTeX JSON inside, or a ``captions.csv`` / ``.jsonl`` with a video
    column. Files: such a JSON, or a CSV / JSONL whose header names a video column.
    """
    p = Path(path)
    try:
        if p.is_dir():
            return _captions_in(p) is not None
        if p.is_file():
            suffix = p.suffix.lower()
            if suffix == ".json":
                return _json_kind(p) is not None
            if suffix in (".csv", ".jsonl"):
                return _has_video_column(p)
    except OSError:
        return False
    return False


def open_video_split(path: str | os.PathLike, split: str | None = None, *,
                     features: str | os.PathLike | FrameFeatures | None = None,
                     dim: int | None = None) -> VideoSplit:
    """Opens one split of a video dataset, finding its captions and frame features.

    ``path`` is a dataset folder — captions from ``MSRVTT_data.json``, VaTeX ``vatex_*.json``
    files (one per split) or ``captions.csv`` / ``.jsonl``; frame features from
    :func:`find_frame_features` (``features/``, a ``.h5`` file, or ``.npy`` files beside the
    captions) — or one of those caption files (features then looked for in its folder).

    Args:
        path: the folder or caption file.
        split: the split (see :func:`read_msrvtt` for MSR-VTT's list files and aliases).
        features: where the frame features are, when not in the default places.
        dim: the frame feature size, if known.
    """
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    if features is None:
        features = find_frame_features(folder)
        if features is None:
            raise DataFormatError(folder, "no frame features found: expected a features/ folder of "
                                          "<video_id>.npy files or a features.h5 file")
    if p.is_dir():
        found = _captions_in(p)
        if found is None:
            raise DataFormatError(p, "no captions found: expected MSRVTT_data.json, vatex_*.json "
                                     "or captions.csv/.jsonl with a video column")
        kind, p = found
        if kind == "vatex":
            if split is None:
                raise ValueError(f"{folder}: a VaTeX folder needs a split (train, val or test)")
            p = _vatex_file(folder, split)
    else:
        kind = {".json": _json_kind(p)}.get(p.suffix.lower(), "pairs")
        if kind is None:
            raise DataFormatError(p, "not an MSR-VTT or VaTeX annotation file")
        if kind == "vatex" and split is not None:
            words = _VATEX_WORDS.get(_canon(split), (str(split).lower(),))
            if not any(w in p.name.lower() for w in words):
                raise ValueError(f"{p}: a VaTeX file holds one split; this one is not {split!r} "
                                 "(pass the folder to choose a split by name)")
    if kind == "msrvtt":
        return read_msrvtt(p, split, features, dim)
    if kind == "vatex":
        return read_vatex(p, features, dim)
    return read_video_pairs(p, split, features, dim)
