"""Evaluate a model on a dataset split: one checkpoint, an ensemble, or validation during training.

Each image is embedded once (from the feature cache when the backbone is frozen), each caption
once, and the ranks are counted from the embeddings block by block
(:func:`vseinf.eval.metrics.evaluate_protocol_from_embeddings`): the similarity matrix is never
built, so a split of 100,000 images × 500,000 captions evaluates in bounded memory. An ensemble
(the paper's "Region+Grid") concatenates its models' embeddings, the image side scaled by the
model's weight: the dot product of the concatenations is the weighted sum of the models'
similarities (by default their average).

Training imports this module (validation each epoch); it imports nothing from training.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..config import RunConfig
from ..data.images import BadImageError, ImageDataset
from ..data.splits import CaptionSplit, open_split, resolve_data_path
from ..features import image_sets, text_sets, uses_image_cache, uses_text_cache
from ..model import VSEModel, checkpoint_path, load_model
from .ensemble import ensemble_embeddings
from .metrics import (
    evaluate_protocol_from_embeddings,
    retrieval_metrics_from_embeddings,
    round_metrics,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Embedding a split


def split_sources(model: VSEModel, split: CaptionSplit, cfg: RunConfig, progress: bool = True):
    """Where the split's images and captions are read from: ``(image_source, text_source)``.

    A source is a feature cache or precomputed sets (:mod:`vseinf.features`; a frozen backbone
    runs once to fill its cache), or None: images decoded and run through the CNN, captions
    tokenized and run through the text tower.
    """
    images = image_sets(model, split, num_workers=cfg.data.num_workers, progress=progress) \
        if uses_image_cache(cfg) else None
    texts = text_sets(model, split, progress=progress) if uses_text_cache(cfg) else None
    return images, texts


@torch.no_grad()
def encode_split(model: VSEModel, split: CaptionSplit, image_source=None, text_source=None, *,
                 batch_size: int = 256, device: str | torch.device = "cpu", num_workers: int = 0):
    """Embed every image of a split once and every caption once (the model is put in eval mode).

    Args:
        model: the model.
        split: the split.
        image_source: its images as sets (see :func:`split_sources`); None decodes the image files.
        text_source: its cached caption token outputs; None tokenizes the captions.
        batch_size: images or captions per forward pass.
        device: where the model runs.
        num_workers: image-decoding processes (live images only).

    Returns:
        ``(image_emb, text_emb, usable)``: n_images × d and n_captions × d float32 tensors on
        ``device``, and a bool mask of the images that could be read (the others' rows are 0).
    """
    model.eval()
    batches = [range(s, min(s + batch_size, split.n_images)) for s in range(0, split.n_images, batch_size)]
    img = torch.zeros(split.n_images, model.embed_dim, device=device)
    usable = np.ones(split.n_images, dtype=bool)
    if image_source is not None:
        for idx in batches:
            feats, lengths = image_source.batch(list(idx))
            emb, _ = model.embed_image_features(feats.to(device), lengths.to(device))
            img[idx.start:idx.stop] = emb.float()
        broken = getattr(image_source, "broken", None)
        if broken is not None:
            usable &= ~broken
    else:
        paths = ImageDataset(split, model.image_transform(train=False)).paths  # fails if no image exists
        encoded = model.encode_images(paths, batch_size, skip_unreadable=True, workers=num_workers)
        for i, reason in encoded.skipped:
            log.warning("skipping unreadable image %s", BadImageError(paths[i], reason))
        usable[:] = False
        usable[encoded.kept] = True
        img[torch.as_tensor(encoded.kept, dtype=torch.long, device=device)] = encoded.embeddings.float().to(device)
    txt = []
    for start in range(0, split.n_captions, batch_size):
        idx = list(range(start, min(start + batch_size, split.n_captions)))
        if text_source is not None:
            feats, lengths = text_source.batch(idx)
            emb, _ = model.embed_text_features(feats.to(device), lengths.to(device))
        else:
            ids, lengths = model.tokenize([split.captions[j] for j in idx])
            emb, _ = model.embed_tokens(ids.to(device), lengths.to(device))
        txt.append(emb.float())
    return img, torch.cat(txt), usable


def drop_unusable(img, txt, text_to_image, usable):
    """Leave out images (or clips) that could not be read, and their captions; renumber the rest."""
    if usable.all():
        return img, txt, text_to_image
    keep_img = np.flatnonzero(usable)
    remap = -np.ones(len(usable), dtype=np.int64)
    remap[keep_img] = np.arange(len(keep_img))
    keep_txt = np.flatnonzero(usable[text_to_image])
    return (img[torch.from_numpy(keep_img).to(img.device)], txt[torch.from_numpy(keep_txt).to(txt.device)],
            remap[text_to_image[keep_txt]])


def evaluate_split(model: VSEModel, image: Any, text: Any, device="cpu", num_workers: int = 0) -> dict:
    """Recall@K table of ``model`` on a split (images that could not be read are left out).

    Args:
        model: the model.
        image, text: the split's two sides as the training loop holds them: ``.split`` (the
            split) and ``.source`` (a feature source, or None for live images / tokens).
        device: where the model runs and the ranks are counted.
        num_workers: image-decoding processes (live images only).
    """
    img, txt, usable = encode_split(model, image.split, image.source, text.source, device=device,
                                    num_workers=num_workers)
    img, txt, t2i = drop_unusable(img, txt, image.split.caption_to_image, usable)
    metrics = round_metrics(retrieval_metrics_from_embeddings(img, txt, t2i))
    metrics["n_images"] = int(len(img))
    metrics["n_captions"] = int(len(txt))
    return metrics


# ---------------------------------------------------------------------------------------------
# Saved checkpoints and ensembles


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, a run directory (its ``best/``) or a bundled model's name."""
    path = checkpoint_path(path)
    if (path / "model.safetensors").is_file():
        return path
    if (path / "best" / "model.safetensors").is_file():
        return path / "best"
    raise ValueError(f"{path}: neither a checkpoint (model.safetensors) nor a run directory with best/")


def checkpoint_embeddings(checkpoint: str | Path, data: str | None, split: str | None, device="cpu",
                          progress: bool = True, max_images: int = 0):
    """``(image_emb, text_emb, text_to_image, split)`` of one checkpoint on a split."""
    ckpt = resolve_checkpoint(checkpoint)
    model = load_model(ckpt, device=device)
    cfg = model.run_config

    if not (data or cfg.data.path):
        raise ValueError(f"{ckpt}: the checkpoint's config has no data.path; pass --data")
    data = resolve_data_path(data, "--data") if data else resolve_data_path(
        cfg.data.path, f"the data.path of {ckpt / 'config.json'}")
    split_obj = open_split(data, split or cfg.data.val_split)
    if max_images:
        split_obj = split_obj.subset(range(min(max_images, split_obj.n_images)))
    image_source, text_source = split_sources(model, split_obj, cfg, progress)
    img, txt, usable = encode_split(model, split_obj, image_source, text_source, device=device,
                                    num_workers=cfg.data.num_workers)
    t2i = split_obj.caption_to_image
    if not usable.all():
        print(f"{split_obj.name}: left out {int((~usable).sum())} unreadable images/clips and their captions")
        img, txt, t2i = drop_unusable(img, txt, t2i, usable)
    return img, txt, t2i, split_obj


def evaluate_checkpoints(checkpoints: Sequence[str | Path], data: str | None = None, split: str | None = None,
                         protocol: str = "all", device: str = "cpu", max_images: int = 0,
                         weights: Sequence[float] | None = None) -> dict:
    """Metrics of one checkpoint, or of the ensemble of several, under ``protocol``.

    Args:
        checkpoints: checkpoint or run directories; several make an ensemble.
        data: the dataset (default: the first checkpoint's data.path).
        split: the split (default: the run's validation split).
        protocol: ``all``, ``coco1k``, ``coco5k`` or ``folds=N``.
        device: where the models run and the ranks are counted.
        max_images: > 0 evaluates only the split's first images (and their captions), for quick checks.
        weights: one per checkpoint, the weights of their similarities (default: equal, an average).
    """
    if weights is not None and len(weights) != len(checkpoints):
        raise ValueError(f"weights: {len(weights)} given for {len(checkpoints)} checkpoints "
                         "(one --weight per --checkpoint)")
    images, texts, t2i_ref, split_obj = [], [], None, None
    for ckpt in checkpoints:
        img, txt, t2i, split_obj = checkpoint_embeddings(ckpt, data, split, device, max_images=max_images)
        if t2i_ref is not None and not np.array_equal(t2i, t2i_ref):
            raise ValueError(f"{ckpt}: evaluates a different set of captions than the first checkpoint")
        t2i_ref = t2i
        images.append(img)
        texts.append(txt)
    if len(images) == 1 and weights is None:
        img, txt = images[0], texts[0]
    else:
        img, txt = ensemble_embeddings(images, texts, weights)
    metrics = round_metrics(evaluate_protocol_from_embeddings(img, txt, t2i_ref, protocol))
    metrics["split"] = split_obj.name
    metrics["checkpoints"] = [str(resolve_checkpoint(c)) for c in checkpoints]
    if weights is not None:
        metrics["weights"] = [float(w) for w in weights]
    return metrics
