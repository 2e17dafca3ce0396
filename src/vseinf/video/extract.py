"""Video files → per-frame features, stored for training: ``vseinf extract --videos``.

    vseinf extract --videos clips/ --out clips_features/ --frames 32 --backbone mobilenet_v2

decodes every clip (:mod:`vseinf.video.decode`), samples frames, runs a frozen image backbone on
the frames in batches, averages each frame's feature map over its grid (one vector per frame) and
stores ``T × D`` float32 features as ``<out>/<video_id>.npy`` — the layout
:class:`vseinf.data.video_datasets.NpyFrameFolder` reads, so the folder can serve as a dataset's
``features/``. A clip that cannot be decoded is reported by name and skipped. ``<out>/extract.json``
records the settings, so features made with other settings are never mixed in by a later run;
:meth:`FrameExtractor.from_settings` rebuilds the extractor from it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.images import ImageTransform, iter_image_batches
from ..encoders.cnn import build_backbone
from .decode import FrameSampler, VideoDecodeError, decode_frames, list_videos

log = logging.getLogger(__name__)

SETTINGS_FILE = "extract.json"


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
        for pixels, _, _ in iter_image_batches(frames, self.transform, self.batch_size, skip_unreadable=False,
                                               read_ahead=False):
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
