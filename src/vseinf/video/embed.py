"""Video embeddings from a trained model, for search over videos (``vseinf encode`` / ``search``).

- :func:`embed_frame_features` — a :class:`~vseinf.data.video_datasets.FrameFeatures` source (a folder of
  ``.npy`` files or an HDF5 file, :func:`vseinf.data.video_datasets.open_frame_features`) → embeddings;
- :func:`embed_video_files` — video files through a :class:`~vseinf.video.extract.FrameExtractor`
  and a video model's tower → embeddings;
- :class:`VideoEmbedder` — any model on video files: a video model through its frame extractor
  and video tower, an image model frame by frame (the mean of frame embeddings).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .decode import FrameSampler, VideoDecodeError, decode_frames
from .extract import FrameExtractor

log = logging.getLogger(__name__)


@torch.no_grad()
def embed_frame_features(model, source, batch_size: int = 128,
                         progress: bool = False) -> tuple[torch.Tensor, np.ndarray]:
    """Video embeddings of every clip of a frame-feature source.

    Args:
        model: a :class:`vseinf.model.VSEModel` with ``image_encoder: frames`` (or region).
        source: a :class:`vseinf.data.video_datasets.FrameFeatures` (e.g. from ``open_frame_features``).
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
