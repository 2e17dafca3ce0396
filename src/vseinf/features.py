"""Feature sources for training and evaluation: frozen-backbone caches and precomputed sets.

A frozen CNN (or text transformer) gives the same output every epoch, so it runs once over a split
and its outputs are stored memory-mapped in fp16 (:mod:`vseinf.data.cache`); training then reads
them at the speed of the disk. Caches are keyed by everything the features depend on (backbone,
weights file, input size, the split's files), so a stale cache is rebuilt, never silently reused.

Every source has ``batch(indices) -> (B × N × C float32 tensor, lengths)`` and ``len()``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import RunConfig
from .data.cache import CHECKPOINT_EVERY, FeatureCache, FeatureCacheWriter, cache_path, open_cache
from .data.images import BadImageError, ImageDataset, skipped_report
from .data.splits import CaptionSplit
from .encoders.text import default_transformer_path

log = logging.getLogger(__name__)

BROKEN_KEY = ""  # cache key of an image that could not be read (its features are zeros)


class ArraySets:
    """Fixed-size precomputed sets (N × R × D, e.g. a memory-mapped ``<split>_ims.npy``)."""

    def __init__(self, array: np.ndarray):
        if array.ndim != 3:
            raise ValueError(f"precomputed features must be N×R×D, got shape {array.shape}")
        self.array = array
        self.broken = np.zeros(len(array), dtype=bool)

    def __len__(self) -> int:
        return len(self.array)

    @property
    def dim(self) -> int:
        return int(self.array.shape[2])

    def batch(self, indices):
        idx = np.asarray(indices, dtype=np.int64)
        out = torch.from_numpy(np.asarray(self.array[np.sort(idx)], dtype=np.float32))
        # memmap fancy-indexing is fastest on sorted rows; restore the requested order
        order = np.argsort(np.argsort(idx, kind="stable"), kind="stable")
        out = out[torch.from_numpy(order)]
        return out, torch.full((len(idx),), self.array.shape[1], dtype=torch.long)


class CachedSets:
    """A :class:`FeatureCache` plus which items are broken images (zero features, to be skipped)."""

    def __init__(self, cache: FeatureCache):
        self.cache = cache
        keys = cache.keys or []
        self.broken = np.array([k == BROKEN_KEY for k in keys], dtype=bool) if keys else \
            np.zeros(len(cache), dtype=bool)

    def __len__(self) -> int:
        return len(self.cache)

    @property
    def dim(self) -> int:
        return self.cache.dim

    def batch(self, indices):
        return self.cache.batch(indices)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:60] or "split"


def _file_id(path: str | Path | None) -> str:
    """Identify a weights file cheaply (name, size, mtime) without hashing gigabytes."""
    if not path:
        return "none"
    p = Path(path)
    if not p.is_file():
        return str(path)
    st = p.stat()
    return f"{p.name}:{st.st_size}:{int(st.st_mtime)}"


def _split_id(split: CaptionSplit, root: str | None = None) -> str:
    """The split's images: their folder (resolved, so the same data typed from another folder is
    the same cache; ``root`` overrides it) and their keys."""
    h = hashlib.sha256()
    h.update((str(Path(split.image_root).resolve()) if root is None else root).encode())
    for key in split.image_keys:
        h.update(key.encode() + b"\0")
    return h.hexdigest()[:16]


def _captions_id(split: CaptionSplit) -> str:
    h = hashlib.sha256()
    for c in split.captions:
        h.update(c.encode() + b"\0")
    return h.hexdigest()[:16]


def uses_image_cache(cfg: RunConfig) -> bool:
    """Grid features come from the cache when the CNN never trains (or the data is precomputed)."""
    return cfg.model.image_encoder != "grid" or (cfg.data.use_cache and not cfg.train.finetune_backbone)


def uses_text_cache(cfg: RunConfig) -> bool:
    """Token outputs come from the cache when a transformer text encoder never trains."""
    return cfg.model.text_encoder == "transformer" and cfg.data.use_cache and not cfg.train.finetune_text


def image_sets(model, split: CaptionSplit, batch_size: int = 32, num_workers: int = 0,
               progress: bool = True, rebuild: bool = False):
    """The image side of ``split`` as sets for the model's set-level head.

    Precomputed features (region / frame splits) are used as they are; for a grid model the frozen
    backbone is run once over the images and its grid vectors cached (fp16, memory-mapped).
    """
    cfg = model.config
    if split.features is not None:
        return ArraySets(split.features)
    if getattr(split, "feature_source", None) is not None:  # e.g. video frame-feature folders
        return split.feature_source
    if cfg.image_encoder != "grid":
        raise ValueError(f"{split.name}: model.image_encoder={cfg.image_encoder!r} needs precomputed "
                         "features, but this split has image files")
    signature = {
        "kind": "grid", "backbone": cfg.backbone, "weights": _backbone_weights_id(model),
        "image_size": cfg.image_size, "images": _split_id(split), "n_images": split.n_images,
    }
    name = f"{_slug(split.name)}-{cfg.backbone}-{cfg.image_size}"
    path = cache_path(name, signature)
    cache = None if rebuild else open_cache(path, signature)
    # Caches made before the folder was keyed by its resolved path are keyed by the path as it was
    # typed: as given now, or relative to this folder (a run that stores its path resolved).
    for typed in dict.fromkeys([str(split.image_root), os.path.relpath(Path(split.image_root).resolve())]):
        legacy = dict(signature, images=_split_id(split, root=typed))
        if cache is None and not rebuild and legacy != signature:
            cache = open_cache(cache_path(name, legacy), legacy)
    if cache is None:
        cache = extract_grid_features(model, split, path, signature, batch_size, num_workers, progress,
                                      restart=rebuild)
    sets = CachedSets(cache)
    if split.n_images and sets.broken.all():  # else training fails later, on an empty epoch
        names = ", ".join(str(split.image_path(i)) for i in range(min(3, split.n_images)))
        raise ValueError(f"none of the {split.n_images} images of {split.name} could be read "
                         f"({names}{', …' if split.n_images > 3 else ''})")
    return sets


def _backbone_weights_id(model) -> str:
    w = model.config.backbone_weights
    if w == "default":
        return f"default:{model.config.backbone}"
    return _file_id(w)


def _interrupted(writer: FeatureCacheWriter, what: str) -> None:
    """Tell the user what an interrupted extraction kept (a resumable writer's last record)."""
    kept = writer.count - writer.count % writer.checkpoint_every if writer.count < writer.n_items else 0
    kept = max(kept, writer.resumed)
    if kept:
        print(f"{writer.directory.name}: {kept:,} of {writer.n_items:,} {what} kept; run the same command "
              "again to continue from there", flush=True)


@torch.no_grad()
def extract_grid_features(model, split: CaptionSplit, path: Path, signature: dict, batch_size: int = 32,
                          num_workers: int = 0, progress: bool = True, restart: bool = False,
                          checkpoint_every: int | None = None) -> FeatureCache:
    """Run the frozen CNN over every image of ``split`` and write its grid vectors to ``path``.

    An unreadable image gets zero features and an empty key; it is reported, and training and
    evaluation skip it. Resumable: an extraction that was stopped continues from its last
    progress record (every ``checkpoint_every`` images, default 1,024) unless ``restart``.
    """
    encoder = model.image
    encoder.eval()
    size = model.config.image_size
    with torch.no_grad():
        probe = encoder.features(torch.zeros(1, 3, size, size, device=model.device))
    n_grid, dim = probe.shape[1], probe.shape[2]
    # Records at multiples of the batch size: a resumed run reads the same batches as one that was not stopped.
    every = checkpoint_every or max(batch_size, CHECKPOINT_EVERY // batch_size * batch_size)
    writer = FeatureCacheWriter(path, dim, split.n_images, set_size=n_grid, keys=list(split.image_keys),
                                signature=signature, resumable=True, restart=restart, checkpoint_every=every)
    start = writer.count
    if start:
        print(f"grid features {split.name}: resuming after {start:,} of {split.n_images:,} images", flush=True)
    paths = ImageDataset(split, model.image_transform(train=False)).paths  # fails if no image exists
    bar = None
    if progress:
        bar = tqdm(total=split.n_images, initial=start, desc=f"grid features {split.name}", unit="img")

    def broken(index: int) -> None:
        writer.keys[index] = BROKEN_KEY
        writer.append(np.zeros((n_grid, dim), dtype=np.float32))

    unreadable = []
    try:
        next_index = start
        for feats, kept, skipped in model.iter_image_batches(paths[start:], batch_size, workers=num_workers,
                                                             grid_features=True):
            for row, position in enumerate(kept):
                while next_index < start + position:  # images skipped as unreadable
                    broken(next_index)
                    next_index += 1
                writer.append(feats[row].float().cpu())
                next_index += 1
            for position, reason in skipped:
                unreadable.append(paths[start + position])
                log.warning("skipping unreadable image %s", BadImageError(paths[start + position], reason))
            if bar:
                bar.update(len(kept) + len(skipped))
        while next_index < split.n_images:
            broken(next_index)
            next_index += 1
        cache = writer.close()
    except BaseException as exc:
        writer.abort()
        if isinstance(exc, KeyboardInterrupt):
            _interrupted(writer, "images")
        raise
    finally:
        if bar:
            bar.close()
    if unreadable:
        log.warning("%s", skipped_report(unreadable))
        print(skipped_report(unreadable))
    return cache


def text_sets(model, split: CaptionSplit, batch_size: int = 64, progress: bool = True, rebuild: bool = False,
              chunk: int = 2048):
    """Frozen-transformer token features of every caption of ``split`` (cached, variable length).

    The captions go through the transformer ``chunk`` at a time (each chunk batched by length), with
    a progress record after each, so a stopped extraction continues from its last chunk.
    """
    cfg = model.config
    if cfg.text_encoder != "transformer":
        raise ValueError("only a transformer text encoder can be cached (the BiGRU trains end to end)")
    signature = {"kind": "tokens", "text_model": cfg.text_model or "minilm-default",
                 "weights": _file_id(_text_weights_file(model)), "max_length": cfg.max_text_length,
                 "captions": _captions_id(split), "n_captions": split.n_captions}
    path = cache_path(f"{_slug(split.name)}-text", signature)
    cache = None if rebuild else open_cache(path, signature)
    if cache is not None:
        return CachedSets(cache)
    n = split.n_captions
    writer = FeatureCacheWriter(path, model.text.hidden_size, n, signature=signature, resumable=True,
                                restart=rebuild, checkpoint_every=chunk)
    start = writer.count
    if start:
        print(f"text features {split.name}: resuming after {start:,} of {n:,} captions", flush=True)
    bar = None
    if progress:
        bar = tqdm(total=n, initial=start, desc=f"text features {split.name}", unit="caption")
    try:
        for first in range(start, n, chunk):
            feats = model.text.token_features(split.captions[first:first + chunk], batch_size=batch_size,
                                              max_length=cfg.max_text_length, progress=False)
            for f in feats:
                writer.append(f)
            if bar:
                bar.update(len(feats))
        cache = writer.close()
    except BaseException as exc:
        writer.abort()
        if isinstance(exc, KeyboardInterrupt):
            _interrupted(writer, "captions")
        raise
    finally:
        if bar:
            bar.close()
    return CachedSets(cache)


def _text_weights_file(model) -> Path | None:
    folder = Path(model.config.text_model) if model.config.text_model else default_transformer_path()
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None
