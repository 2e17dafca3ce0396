"""What a training batch is made of: the splits, each side's inputs, and the epoch's caption order.

Each side of a batch is either read from a feature cache (frozen backbone: grid vectors, or token
outputs of a frozen transformer; and precomputed region/frame sets) or computed live (fine-tuned
CNN on images, BiGRU or fine-tuned transformer on tokens). The model tells the two apart by the
input's shape (see :meth:`vseinf.model.VSEModel.forward`).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ..config import RunConfig
from ..data.images import ImageBatches, ImageDataset, image_batch_loader
from ..data.splits import CaptionSplit, open_split
from ..distributed import World
from ..encoders.text import drop_token_features
from ..features import image_sets, text_sets, uses_image_cache, uses_text_cache
from ..model import VSEModel


def load_splits(cfg: RunConfig) -> tuple[CaptionSplit, CaptionSplit]:
    """The training and validation splits of ``data.path``, cut to ``max_train_images`` and
    ``max_val_images`` when those are set."""
    if not cfg.data.path:
        raise ValueError("data.path is not set: pass --data DIR or set data.path in the config")
    train = open_split(cfg.data.path, cfg.data.train_split)
    val = open_split(cfg.data.path, cfg.data.val_split)
    if cfg.data.max_train_images:
        train = train.subset(range(min(cfg.data.max_train_images, train.n_images)))
    if cfg.data.max_val_images:
        val = val.subset(range(min(cfg.data.max_val_images, val.n_images)))
    return train, val


class Side:
    """One modality of the training data: cached sets, or live inputs run through the tower."""

    def __init__(self, kind: str, source=None, split: CaptionSplit | None = None):
        self.kind = kind  # "sets" | "images" | "tokens"
        self.source = source
        self.split = split

    @property
    def cached(self) -> bool:
        """Inputs are read from a feature cache (else decoded or tokenized from the split)."""
        return self.source is not None


def image_side(model: VSEModel, split: CaptionSplit, cfg: RunConfig, progress: bool) -> Side:
    if uses_image_cache(cfg):
        return Side("sets", image_sets(model, split, num_workers=cfg.data.num_workers, progress=progress), split)
    return Side("images", split=split)


def text_side(model: VSEModel, split: CaptionSplit, cfg: RunConfig, progress: bool) -> Side:
    if uses_text_cache(cfg):
        return Side("sets", text_sets(model, split, progress=progress), split)
    return Side("tokens", split=split)


def live_images(model: VSEModel, split: CaptionSplit, train: bool, batches, num_workers: int, device,
                seed_key=None, first_step: int = 0):
    """An iterator over ``(pixels | None, kept positions)`` for each batch of image indices (live
    CNN path): worker processes decode ahead; unreadable images are dropped from their batch."""
    dataset = ImageDataset(split, model.image_transform(train=train))
    return iter(image_batch_loader(ImageBatches(dataset, batches, seed_key, first_step), num_workers,
                                   pin_memory=torch.device(device).type == "cuda"))


def image_inputs(side: Side, image_indices, device, live=None):
    """The model's image input for ``image_indices``: ``(images or sets, lengths, kept positions)``.
    Cached sides read sets and their lengths; live ones take the next decoded batch from ``live``
    (see :func:`live_images`), from which unreadable images were dropped (``None`` if none is left)."""
    if side.cached:
        feats, lengths = side.source.batch(image_indices)
        return feats.to(device), lengths.to(device), list(range(len(image_indices)))
    pixels, keep = next(live)
    if pixels is None:
        return None, None, keep
    return pixels.to(device, non_blocking=True), None, keep


def caption_inputs(model: VSEModel, side: Side, caption_indices, device, augment: bool,
                   rng: random.Random | None = None, generator: torch.Generator | None = None):
    """The model's text input for ``caption_indices``: ``(token ids or cached token outputs, lengths)``,
    augmented for training (tokens masked/replaced/deleted, or cached outputs dropped)."""
    if side.cached:
        feats, lengths = side.source.batch(caption_indices)
        feats, lengths = feats.to(device), lengths.to(device)
        if augment and model.config.size_augment:
            feats, lengths = drop_token_features(feats, lengths, generator=generator)
        return feats, lengths
    texts = [side.split.captions[int(j)] for j in caption_indices]
    augment_rng = (rng or random.Random()) if augment and model.config.text_augment else None
    ids, lengths = model.tokenize(texts, augment=augment_rng)
    return ids.to(device), lengths.to(device)


def embed_images(model: VSEModel, side: Side, image_indices, device, live=None):
    """Image embeddings of ``image_indices``; returns (embeddings or None, kept positions)."""
    images, lengths, keep = image_inputs(side, image_indices, device, live)
    return (None if images is None else model.embed_images(images, lengths)), keep


def epoch_order(n: int, seed: int, epoch: int, world: World, batch_size: int) -> np.ndarray:
    """This rank's caption order for an epoch: a seeded permutation cut into global batches of
    ``batch_size × world.size``; rank r takes the r-th slice of each, so the union of the ranks' batch
    k is exactly the single-process batch k of the same global size. Whole batches only."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    global_batch = batch_size * world.size
    steps = len(perm) // global_batch
    if steps == 0:
        raise ValueError(f"batch size {batch_size} × {world.size} process(es) is larger than the "
                         f"{n} training captions")
    batches = perm[: steps * global_batch].reshape(steps, world.size, batch_size)
    return batches[:, world.rank].reshape(-1)
