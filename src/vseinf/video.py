"""Video files → per-frame features → video embeddings.

    vseinf extract --videos clips/ --out clips_features/ --frames 32 --backbone mobilenet_v2

decodes every clip with PyAV (its wheels bundle FFmpeg), samples frames (a uniform count over the
clip, or a rate in frames per second), runs a frozen image backbone on the frames in batches,
averages each frame's feature map over its grid (one vector per frame) and stores ``T × D`` float32
features as ``<out>/<video_id>.npy`` — the layout :class:`vseinf.data.video.NpyFrameFolder`
reads, so the folder can serve as a dataset's ``features/``. A clip that cannot be decoded is
reported by name and skipped. ``<out>/extract.json`` records the settings, so features made
with other settings are never mixed in by a later run.

For search over videos (``vseinf encode``):

- :func:`embed_frame_features` — a :class:`~vseinf.data.video.FrameFeatures` source (a folder of
  ``.npy`` files or an HDF5 file, :func:`vseinf.data.video.open_frame_features`) → embeddings;
- :class:`FrameExtractor` — the same frame features for video files in memory
  (:meth:`FrameExtractor.features`), rebuilt from an ``extract.json`` by
  :meth:`FrameExtractor.from_settings`; :func:`embed_video_files` embeds files with it;
- :func:`middle_frame` — a clip's middle frame as a PIL image (a thumbnail);
- :class:`VideoEmbedder` — any model on video files: a video model through its frame extractor
  and video tower, an image model frame by frame (the mean of frame embeddings).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = [
    "VIDEO_SUFFIXES",
    "ExtractReport",
    "FrameExtractor",
    "FrameSampler",
    "VideoDecodeError",
    "VideoEmbedder",
    "add_extract_video_arguments",
    "decode_all_frames",
    "decode_frames",
    "embed_frame_features",
    "embed_video_files",
    "extract_video_features",
    "list_videos",
    "middle_frame",
    "run_extract_video",
]

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv",
                  ".flv", ".3gp", ".ts", ".gif")
SETTINGS_FILE = "extract.json"


class VideoDecodeError(ValueError):
    """A file that is not a decodable video (the message names it and says why)."""


def _av():
    try:
        import av
    except ImportError:
        raise ValueError("decoding video files needs PyAV (pip install av, or "
                         "pip install 'vseinf[video]')") from None
    return av


# --------------------------------------------------------------------------------------------
# Frame sampling and decoding
# --------------------------------------------------------------------------------------------


@dataclass
class FrameSampler:
    """Which frames of a clip become its feature set.

    Args:
        num_frames: a uniform count: the clip is cut into this many equal segments and the
            middle frame of each is kept (clips with fewer frames keep them all).
        fps: instead of a count, keep frames at this rate (the first frame at or after each
            multiple of 1/fps seconds); ``num_frames`` must then be ``None``.
        max_frames: with ``fps``, keep at most this many (evenly thinned); ``None``: no cap.
    """

    num_frames: int | None = 32
    fps: float | None = None
    max_frames: int | None = None

    def __post_init__(self) -> None:
        if (self.num_frames is None) == (self.fps is None):
            raise ValueError("frame sampling: give either a frame count or an fps, not both")
        if self.num_frames is not None and int(self.num_frames) <= 0:
            raise ValueError(f"frame sampling: num_frames must be positive, got {self.num_frames}")
        if self.fps is not None and not float(self.fps) > 0:
            raise ValueError(f"frame sampling: fps must be positive, got {self.fps}")
        if self.max_frames is not None and int(self.max_frames) <= 0:
            raise ValueError(f"frame sampling: max_frames must be positive, got {self.max_frames}")

    def uniform_indices(self, n_frames: int) -> list[int]:
        """Frame indices for a clip of ``n_frames`` frames (count mode)."""
        n = int(self.num_frames)
        if n_frames <= n:
            return list(range(n_frames))
        return [int((k + 0.5) * n_frames / n) for k in range(n)]

    def select(self, times: Sequence[float]) -> list[int]:
        """Indices of the frames to keep, given every frame's time in seconds (in order).

        The reference rule that :func:`decode_frames` applies while streaming.
        """
        if self.num_frames is not None:
            return self.uniform_indices(len(times))
        keep, target = [], 0.0
        step = 1.0 / float(self.fps)
        for i, t in enumerate(times):
            if t + 1e-6 >= target:
                keep.append(i)
                target = (math.floor((t + 1e-6) / step) + 1) * step
        return self._cap(keep)

    def _cap(self, keep: list[int]) -> list[int]:
        if self.max_frames is None or len(keep) <= self.max_frames:
            return keep
        m = int(self.max_frames)
        return [keep[int((k + 0.5) * len(keep) / m)] for k in range(m)]


def _open(path: Path):
    av = _av()
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoDecodeError(f"{path}: not a readable video ({e})") from None
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{path}: no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame-parallel decoding; the output order is unchanged
    return container, stream


def _frame_time(frame, index: int, rate: float) -> float:
    return float(frame.time) if frame.time is not None else index / rate


def _count_frames(path: Path) -> int:
    """Frames in the clip: the container's count, or (when it has none) a count of its packets."""
    container, stream = _open(path)
    try:
        if stream.frames:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size)
    except _av().error.FFmpegError as e:
        raise VideoDecodeError(f"{path}: cannot read ({e})") from None
    finally:
        container.close()


def decode_frames(path: str | os.PathLike, sampler: FrameSampler) -> Iterator:
    """Decodes ``path`` once, yielding the sampled frames as RGB PIL images, in order.

    Only the kept frames are converted, so memory stays at one frame. Raises
    :class:`VideoDecodeError` for a file that cannot be decoded or holds no frame.
    """
    path = Path(path)
    av = _av()
    wanted: set[int] | None = None
    if sampler.num_frames is not None:
        wanted = set(sampler.uniform_indices(_count_frames(path)))
    container, stream = _open(path)
    rate = float(stream.average_rate or 25)
    target, step = 0.0, (1.0 / float(sampler.fps) if sampler.fps else 0.0)
    n = 0
    try:
        if sampler.fps is not None and sampler.max_frames is not None:
            # The cap thins the whole clip evenly, so the kept set is known only at the end:
            # take the times first (cheap: no colour conversion), then decode again.
            times = [_frame_time(f, i, rate) for i, f in enumerate(container.decode(stream))]
            container.close()
            wanted = set(sampler.select(times))
            container, stream = _open(path)
        for i, frame in enumerate(container.decode(stream)):
            n = i + 1
            if wanted is not None:
                if i in wanted:
                    yield frame.to_image()
                continue
            t = _frame_time(frame, i, rate)
            if t + 1e-6 >= target:
                yield frame.to_image()
                target = (math.floor((t + 1e-6) / step) + 1) * step
    except av.error.FFmpegError as e:
        raise VideoDecodeError(f"{path}: decoding failed after {n} frames ({e})") from None
    finally:
        container.close()
    if n == 0:
        raise VideoDecodeError(f"{path}: no decodable frame")


def decode_all_frames(path: str | os.PathLike) -> tuple[list, list[float]]:
    """The slow, obviously-right twin of :func:`decode_frames`: every frame and its time.

    ``[frames[i] for i in sampler.select(times)]`` equals ``list(decode_frames(path, sampler))``.
    Holds the whole clip in memory: for tests and short clips only.
    """
    path = Path(path)
    container, stream = _open(path)
    rate = float(stream.average_rate or 25)
    try:
        frames, times = [], []
        for i, frame in enumerate(container.decode(stream)):
            frames.append(frame.to_image())
            times.append(_frame_time(frame, i, rate))
    except _av().error.FFmpegError as e:
        raise VideoDecodeError(f"{path}: decoding failed ({e})") from None
    finally:
        container.close()
    return frames, times


def middle_frame(path: str | os.PathLike):
    """The frame in the middle of a clip, as a PIL image (for thumbnails)."""
    frames = list(decode_frames(path, FrameSampler(num_frames=1)))
    if not frames:
        raise VideoDecodeError(f"{path}: no decodable frame")
    return frames[0]


def list_videos(folder: str | os.PathLike) -> list[Path]:
    """The video files in ``folder`` (by suffix, sorted); an error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder of videos")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no video files ({', '.join(VIDEO_SUFFIXES)})")
    return files


# --------------------------------------------------------------------------------------------
# Frame features
# --------------------------------------------------------------------------------------------


class FrameExtractor:
    """A frozen image backbone applied to video frames: one global-average vector per frame.

    Args:
        backbone: a name from :data:`vseinf.encoders.cnn.BACKBONE_NAMES`.
        weights: "default" (the backbone package's ImageNet weights), a file, or None (random).
        image_size: frames are resized to this square size (aspect not kept, like images).
        sampler: which frames to use.
        batch_size: frames per backbone call.
        device: where the backbone runs.
    """

    def __init__(self, backbone: str = "mobilenet_v2", weights: str | os.PathLike | None = "default",
                 image_size: int = 224, sampler: FrameSampler | None = None, batch_size: int = 32,
                 device: str | torch.device = "cpu") -> None:
        from .data.images import ImageTransform
        from .encoders.cnn import build_backbone

        if int(batch_size) <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.backbone_name = backbone
        self.weights = weights
        self.image_size = int(image_size)
        self.sampler = sampler or FrameSampler()
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.backbone = build_backbone(backbone, weights).to(self.device).eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.transform = ImageTransform(self.image_size, train=False, mean=self.backbone.mean,
                                        std=self.backbone.std)

    @property
    def dim(self) -> int:
        return int(self.backbone.out_channels)

    @classmethod
    def from_settings(cls, settings: dict | str | os.PathLike, weights: str | os.PathLike | None = None,
                      batch_size: int = 32, device: str | torch.device = "cpu") -> FrameExtractor:
        """The extractor that made a folder of features, from its ``extract.json`` (or the dict).

        Args:
            settings: the dict, the ``extract.json`` file, or the folder holding it.
            weights: the backbone weights file, when the features were made with one (the
                settings record only its name and size); checked against them.
            batch_size: frames per backbone call.
            device: where the backbone runs.
        """
        if not isinstance(settings, dict):
            path = Path(settings)
            path = path / SETTINGS_FILE if path.is_dir() else path
            try:
                settings = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: not readable extraction settings ({e})") from None
        recorded = settings.get("weights")
        if weights is None:
            if recorded not in (None, "default"):
                raise ValueError(f"the features were made with the weights file {recorded!r}; "
                                 "pass weights=<that file>")
            weights = recorded
        sampler = FrameSampler(**settings["sampler"])
        ext = cls(settings["backbone"], weights, settings["image_size"], sampler, batch_size, device)
        if ext.settings() != settings:
            raise ValueError(f"the rebuilt extractor's settings {ext.settings()} differ from the "
                             f"recorded ones {settings}")
        return ext

    def settings(self) -> dict:
        """What the features depend on (stored as ``extract.json``)."""
        w = self.weights
        if w not in (None, "default"):
            st = Path(w).stat()
            w = f"{Path(w).name}:{st.st_size}"
        return {"backbone": self.backbone_name, "weights": w, "image_size": self.image_size,
                "sampler": asdict(self.sampler), "dim": self.dim, "pooling": "grid-mean"}

    @torch.inference_mode()
    def embed_frames(self, frames: Sequence) -> np.ndarray:
        """PIL frames → ``T × D`` float32: the backbone's feature map averaged over its grid."""
        out = []
        for start in range(0, len(frames), self.batch_size):
            pixels = torch.stack([self.transform(f.convert("RGB"))
                                  for f in frames[start:start + self.batch_size]])
            fmap = self.backbone(pixels.to(self.device))
            out.append(fmap.float().mean(dim=(2, 3)).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)

    def features(self, path: str | os.PathLike) -> np.ndarray:
        """One clip's ``T × D`` frame features (raises :class:`VideoDecodeError`)."""
        frames = list(decode_frames(path, self.sampler))
        if not frames:
            raise VideoDecodeError(f"{path}: no frame sampled")
        return self.embed_frames(frames)


@dataclass
class ExtractReport:
    """What :func:`extract_video_features` did."""

    written: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        line = (f"{len(self.written)} clip(s) extracted, {len(self.existing)} already there, "
                f"{len(self.failed)} failed")
        if self.failed:
            line += ": " + "; ".join(f"{k}: {v}" for k, v in list(self.failed.items())[:10])
        return line


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)  # a killed run never leaves a half-written <id>.npy
    except BaseException:  # Ctrl-C or a full disk: no temporary file is left behind either
        tmp.unlink(missing_ok=True)
        raise


def extract_video_features(videos: str | os.PathLike | Sequence[str | os.PathLike],
                           out_dir: str | os.PathLike, extractor: FrameExtractor | None = None,
                           rebuild: bool = False, progress: bool = True) -> ExtractReport:
    """Frame features of every clip, saved as ``<out_dir>/<video_id>.npy`` (``T × D`` float32).

    Args:
        videos: a folder of video files, or a list of files. The video id is the file stem.
        out_dir: where the ``.npy`` files (and ``extract.json``) go; created if needed.
        extractor: backbone and sampling (default: :class:`FrameExtractor` defaults).
        rebuild: recompute clips whose ``.npy`` already exists (otherwise they are kept,
            so an interrupted run resumes).
        progress: show a progress bar.

    A clip that cannot be decoded is reported (log and ``report.failed``) and skipped. Features
    made with other settings (``extract.json`` differs) are refused unless ``rebuild``.
    """
    files = list_videos(videos) if isinstance(videos, (str, os.PathLike)) else [Path(v) for v in videos]
    by_id: dict[str, Path] = {}
    for f in files:
        if f.stem in by_id:
            raise ValueError(f"two videos with the id {f.stem!r}: {by_id[f.stem]} and {f}")
        by_id[f.stem] = f
    extractor = extractor or FrameExtractor()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = extractor.settings()
    settings_path = out / SETTINGS_FILE
    if settings_path.is_file() and not rebuild:
        old = json.loads(settings_path.read_text())
        if old != settings:
            raise ValueError(f"{settings_path}: the features there were made with other settings "
                             f"({old}); pass --rebuild or choose another --out")
    settings_path.write_text(json.dumps(settings, indent=1) + "\n")

    report = ExtractReport()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(by_id), desc="video features", unit="clip")
    try:
        for vid, path in by_id.items():
            target = out / f"{vid}.npy"
            if target.is_file() and not rebuild:
                report.existing.append(vid)
            else:
                try:
                    feats = extractor.features(path)
                except VideoDecodeError as e:
                    report.failed[vid] = str(e)
                    log.warning("skipping %s", e)
                else:
                    _save_npy_atomic(target, feats.astype(np.float32))
                    report.written.append(vid)
            if bar:
                bar.update(1)
                if report.failed:
                    bar.set_postfix(failed=len(report.failed))
    finally:
        if bar:
            bar.close()
    return report


# --------------------------------------------------------------------------------------------
# Embedding frame features with a trained model (for vseinf encode / search)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def embed_frame_features(model, source, batch_size: int = 128,
                         progress: bool = False) -> tuple[torch.Tensor, np.ndarray]:
    """Video embeddings of every clip of a frame-feature source.

    Args:
        model: a :class:`vseinf.model.VSEModel` with ``image_encoder: frames`` (or region).
        source: a :class:`vseinf.data.video.FrameFeatures` (e.g. from ``open_frame_features``).
        batch_size: clips per forward pass.
        progress: show a progress bar.

    Returns:
        (``n × d`` unit embeddings on the model's device — zeros for broken clips, a bool mask of
        the usable clips; ``source.video_ids`` names the rows).
    """
    if source.dim != model.config.feature_dim:
        raise ValueError(f"{source.where}: {source.dim}-d frame features, the model was trained on "
                         f"{model.config.feature_dim}-d (model.feature_dim)")
    was_training = model.training
    model.eval()
    rows = []
    starts = range(0, len(source), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="videos", unit="batch")
    try:
        for start in starts:
            idx = list(range(start, min(start + batch_size, len(source))))
            feats, lengths = source.batch(idx)
            emb, _ = model.embed_image_features(feats.to(model.device), lengths.to(model.device))
            rows.append(emb.float())
    finally:
        model.train(was_training)
    emb = torch.cat(rows) if rows else torch.zeros(0, model.embed_dim, device=model.device)
    ok = ~np.asarray(source.broken, dtype=bool)
    emb[torch.from_numpy(~ok).to(emb.device)] = 0.0
    return emb, ok


@torch.no_grad()
def embed_video_files(model, paths: Sequence[str | os.PathLike], extractor: FrameExtractor,
                      batch_size: int = 16, progress: bool = False
                      ) -> tuple[torch.Tensor, np.ndarray, dict[str, str]]:
    """Video embeddings straight from video files (decode → frame features → video tower).

    ``extractor`` must be the one the model's training features were made with (see
    :meth:`FrameExtractor.from_settings`). Undecodable files get a zero row, ``False`` in the
    mask and an entry (file → reason) in the returned dict.

    Returns:
        (``n × d`` unit embeddings, bool mask of usable files, failures).
    """
    if extractor.dim != model.config.feature_dim:
        raise ValueError(f"the extractor gives {extractor.dim}-d frame features, the model was "
                         f"trained on {model.config.feature_dim}-d (model.feature_dim)")
    paths = [Path(p) for p in paths]
    emb = torch.zeros(len(paths), model.embed_dim, device=model.device)
    ok = np.zeros(len(paths), dtype=bool)
    failed: dict[str, str] = {}
    items = paths
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(paths, desc="videos", unit="clip")
    pending: list[tuple[int, np.ndarray]] = []

    def flush():
        if pending:
            rows = model.encode_image_features([f for _, f in pending])
            emb[torch.tensor([i for i, _ in pending], device=emb.device)] = rows.float()
            pending.clear()

    for i, path in enumerate(items):
        try:
            pending.append((i, extractor.features(path)))
            ok[i] = True
        except VideoDecodeError as e:
            failed[str(path)] = str(e)
            log.warning("skipping %s", e)
        if len(pending) >= batch_size:
            flush()
    flush()
    return emb, ok, failed


# --------------------------------------------------------------------------------------------
# One embedding per video file, with any model (for vseinf encode / search on video folders)
# --------------------------------------------------------------------------------------------

# Frames per clip when nothing else says: 32 for video models (the `vseinf extract` default, so
# features match a model trained on extracted features); 8 for image models, whose clip embedding
# is a mean of whole-model frame embeddings — each frame costs a full image-tower pass, and the
# mean of 8 frames spread over a short clip already changes little with more.
VIDEO_MODEL_FRAMES = 32
IMAGE_MODEL_FRAMES = 8


class VideoEmbedder:
    """A VSE model applied to video files: sampled frames → one unit embedding per clip.

    How depends on the model's image tower:

    - a video model (``image_encoder: frames``, or ``region``): ``extractor`` turns the frames into
      ``T × D`` features and the model's video tower (fc + MLP → GPO over the frames → l2norm)
      embeds the set — the VSE∞ video path. The extractor must give the features the model was
      trained on (see :meth:`for_model`).
    - an image model (``image_encoder: grid``): every frame goes through the image tower; the clip
      is the normalised mean of its frame embeddings (a plain, robust baseline that lets an
      image–text model such as the bundled one search videos without video training).

    Args:
        model: a :class:`vseinf.model.VSEModel`.
        sampler: which frames to use (default: ``extractor.sampler``, else
            :data:`IMAGE_MODEL_FRAMES` uniform frames).
        extractor: the frame-feature extractor (video models only; required for them).
    """

    def __init__(self, model, sampler: FrameSampler | None = None,
                 extractor: FrameExtractor | None = None) -> None:
        self.model = model
        self.video_model = model.config.image_encoder != "grid"
        if self.video_model:
            if extractor is None:
                raise ValueError("a video model embeds frame features: pass the FrameExtractor "
                                 "its training features were made with")
            if extractor.dim != model.config.feature_dim:
                raise ValueError(
                    f"this video model takes {model.config.feature_dim}-d frame features, but "
                    f"{extractor.backbone_name} frames give {extractor.dim}-d; use the extraction "
                    "settings of the features it was trained on (--extract-settings "
                    "FEATURES/extract.json, made by `vseinf extract --videos`), or encode a "
                    "folder of frame-feature files instead")
            if sampler is not None and sampler != extractor.sampler:
                extractor.sampler = sampler
        elif extractor is not None:
            raise ValueError("a frame-feature extractor is for video models (image_encoder: "
                             "frames); this model embeds frames as images")
        self.extractor = extractor
        self.sampler = sampler or (extractor.sampler if extractor is not None
                                   else FrameSampler(num_frames=IMAGE_MODEL_FRAMES))

    @classmethod
    def for_model(cls, model, frames: int | None = None,
                  extract_settings: dict | str | os.PathLike | None = None,
                  backbone_weights: str | os.PathLike | None = None) -> VideoEmbedder:
        """The embedder ``vseinf encode`` uses for a folder of video files.

        Args:
            model: the model.
            frames: uniform frames per clip (default: the extraction settings', else
                :data:`VIDEO_MODEL_FRAMES` for video models, :data:`IMAGE_MODEL_FRAMES` for
                image models).
            extract_settings: video models: the ``extract.json`` (or its folder, or the dict)
                of the features the model was trained on. Without it the extractor is the
                model config's backbone at 224 px — right for features made by ``vseinf extract``
                with its defaults, refused (dimension check) otherwise.
            backbone_weights: the backbone weights file, when the settings name one.
        """
        sampler = FrameSampler(num_frames=int(frames)) if frames is not None else None
        if model.config.image_encoder == "grid":
            if extract_settings is not None:
                raise ValueError("--extract-settings is for video models (image_encoder: frames); "
                                 "this model embeds each frame as an image")
            return cls(model, sampler)
        device = model.device
        if extract_settings is not None:
            extractor = FrameExtractor.from_settings(extract_settings, weights=backbone_weights,
                                                     device=device)
        else:
            weights = backbone_weights or model.config.backbone_weights
            weights = None if weights in ("none", "") else weights
            extractor = FrameExtractor(model.config.backbone, weights, 224,
                                       FrameSampler(num_frames=VIDEO_MODEL_FRAMES), device=device)
        return cls(model, sampler, extractor)

    def settings(self) -> dict:
        """What the embeddings depend on besides the model (stored in the gallery, JSON)."""
        out: dict = {"method": "frame-features" if self.video_model else "frame-images",
                     "sampler": asdict(self.sampler)}
        if self.extractor is not None:
            weights = self.extractor.weights
            if weights not in (None, "default"):
                weights = str(Path(weights).resolve())
            out["extractor"] = {"backbone": self.extractor.backbone_name, "weights": weights,
                                "image_size": self.extractor.image_size}
            out["extractor_settings"] = self.extractor.settings()
        return out

    @classmethod
    def from_settings(cls, model, settings: dict) -> VideoEmbedder:
        """Rebuild the embedder recorded by :meth:`settings` (for queries against a gallery)."""
        try:
            sampler = FrameSampler(**settings["sampler"])
            method = settings["method"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"video settings: missing or malformed field ({e})") from None
        if (method == "frame-features") != (model.config.image_encoder != "grid"):
            raise ValueError(f"the gallery's videos were embedded by {method!r}, which does not fit "
                             f"this model (image_encoder: {model.config.image_encoder})")
        if method == "frame-images":
            return cls(model, sampler)
        spec = settings.get("extractor") or {}
        try:
            extractor = FrameExtractor(spec["backbone"], spec["weights"], spec["image_size"], sampler,
                                       device=model.device)
        except KeyError as e:
            raise ValueError(f"video settings: the extractor lacks field {e}") from None
        except OSError as e:
            raise ValueError(f"the frame extractor's weights are not readable ({e})") from None
        if extractor.settings() != settings.get("extractor_settings"):
            raise ValueError(f"the frame extractor rebuilt from the gallery ({extractor.settings()}) "
                             f"differs from the recorded one ({settings.get('extractor_settings')})")
        return cls(model, sampler, extractor)

    @torch.no_grad()
    def embed_frames(self, frames: Sequence) -> np.ndarray:
        """PIL frames of one clip → its ``d`` float32 unit embedding."""
        if not frames:
            raise ValueError("no frames to embed")
        if self.video_model:
            feats = self.extractor.embed_frames(frames)
            emb = self.model.encode_image_features([torch.from_numpy(feats)])[0]
        else:
            emb = self.model.encode_images([f.convert("RGB") for f in frames]).float().mean(0)
            emb = emb / emb.norm().clamp_min(1e-12)
        return emb.float().cpu().numpy()

    def embed_file(self, path: str | os.PathLike):
        """One clip → (``d`` unit embedding, a middle frame as a PIL image, frames used).

        The middle frame is the sampled frame nearest the middle of the clip (the exact middle
        for an odd uniform count), so the clip is decoded only once. Raises
        :class:`VideoDecodeError` naming a file that cannot be decoded.
        """
        frames = list(decode_frames(path, self.sampler))
        if not frames:
            raise VideoDecodeError(f"{path}: no frame sampled")
        return self.embed_frames(frames), frames[len(frames) // 2], len(frames)


# --------------------------------------------------------------------------------------------
# Command line: vseinf extract --videos DIR --out DIR
# --------------------------------------------------------------------------------------------


def add_extract_video_arguments(parser) -> None:
    """Adds the video-file options to the ``vseinf extract`` parser."""
    from .argtypes import positive_float, positive_int

    g = parser.add_argument_group("video files (vseinf extract --videos DIR --out DIR)")
    g.add_argument("--videos", help="a folder of video files: decode, sample frames, store T×D "
                                    "features as <out>/<video_id>.npy")
    g.add_argument("--out", help="output folder for the .npy frame features")
    g.add_argument("--frames", type=positive_int, default=None,
                   help="uniform frame count per clip (default 32)")
    g.add_argument("--fps", type=positive_float, default=None, help="sample at this rate instead of a count")
    g.add_argument("--max-frames", type=positive_int, default=None, help="with --fps: at most this many frames")
    g.add_argument("--backbone", default=None,
                   help="image backbone (default: the config's model.backbone, else mobilenet_v2)")
    g.add_argument("--backbone-weights", default=None, help="'default', a weights file, or 'none'")
    g.add_argument("--image-size", type=positive_int, default=None, help="frame input size (default 224)")
    g.add_argument("--frame-batch", type=positive_int, default=32, help="frames per backbone call")
    if not any("--device" in a.option_strings for a in parser._actions):
        parser.add_argument("--device", default="cpu", help="where the backbones run (cpu, cuda, cuda:1…)")
    if not any("--rebuild" in a.option_strings for a in parser._actions):
        parser.add_argument("--rebuild", action="store_true", help="recompute existing features")
    if not any("--no-progress" in a.option_strings for a in parser._actions):
        parser.add_argument("--no-progress", action="store_true")


def run_extract_video(args, extra=()) -> int:
    """``vseinf extract --videos DIR --out DIR``: the video-file branch of the extract command."""
    if extra:
        raise ValueError(f"extract --videos: unknown arguments {' '.join(extra)}")
    if not args.out:
        raise ValueError("extract --videos needs --out DIR (where the .npy features go)")
    if args.frames is not None and args.fps is not None:
        raise ValueError("extract --videos: give --frames or --fps, not both")
    backbone, weights, size = "mobilenet_v2", "default", 224
    if getattr(args, "config", None):
        from .config import load_config

        cfg = load_config(args.config)
        backbone, weights = cfg.model.backbone, cfg.model.backbone_weights
    backbone = args.backbone or backbone
    weights = args.backbone_weights or weights
    weights = None if weights in ("none", "") else weights
    sampler = (FrameSampler(num_frames=None, fps=args.fps, max_frames=args.max_frames)
               if args.fps is not None else FrameSampler(num_frames=args.frames or 32))
    extractor = FrameExtractor(backbone, weights, args.image_size or size, sampler,
                               batch_size=args.frame_batch, device=args.device)
    report = extract_video_features(args.videos, args.out, extractor,
                                    rebuild=getattr(args, "rebuild", False),
                                    progress=not getattr(args, "no_progress", False))
    print(f"{args.out}: {report.summary()}")
    return 0 if report.written or report.existing else 1
