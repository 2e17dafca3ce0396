"""Evaluate saved checkpoints on a dataset split: one model or an ensemble (averaged similarities).

Each image is encoded once (from the feature cache when the backbone is frozen), each caption once;
the similarity matrices of several checkpoints are averaged before ranking (the paper's
"Region+Grid" ensembles).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .evaluation import ensemble_sims, evaluate_protocol


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its ``best/``)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    if (path / "best" / "model.safetensors").is_file():
        return path / "best"
    raise ValueError(f"{path}: neither a checkpoint (model.safetensors) nor a run directory with best/")


def checkpoint_similarities(checkpoint: str | Path, data: str | None, split: str | None, device="cpu",
                            progress: bool = True, max_images: int = 0):
    """(sims n_images × n_captions, text_to_image, split) of one checkpoint on a split."""
    from .data.splits import open_split
    from .model import load_model
    from .train import drop_unusable, encode_split, image_side, text_side

    ckpt = resolve_checkpoint(checkpoint)
    model = load_model(ckpt, device=device)
    cfg = model.run_config
    from .train import resolve_data_path

    if not (data or cfg.data.path):
        raise ValueError(f"{ckpt}: the checkpoint's config has no data.path; pass --data")
    data = resolve_data_path(data, "--data") if data else resolve_data_path(
        cfg.data.path, f"the data.path of {ckpt / 'config.json'}")
    split_obj = open_split(data, split or cfg.data.val_split)
    if max_images:
        split_obj = split_obj.subset(range(min(max_images, split_obj.n_images)))
    img_side = image_side(model, split_obj, cfg, progress)
    txt_side = text_side(model, split_obj, cfg, progress)
    img, txt, usable = encode_split(model, img_side, txt_side, device=device, num_workers=cfg.data.num_workers)
    t2i = split_obj.caption_to_image
    if not usable.all():
        print(f"{split_obj.name}: left out {int((~usable).sum())} unreadable images/clips and their captions")
        img, txt, t2i = drop_unusable(img, txt, t2i, usable)
    return (img @ txt.T).cpu(), t2i, split_obj


def evaluate_checkpoints(checkpoints, data: str | None = None, split: str | None = None, protocol: str = "all",
                         device: str = "cpu", max_images: int = 0) -> dict:
    """Metrics of one checkpoint, or of the ensemble of several, under ``protocol``.

    ``max_images`` > 0 evaluates only the split's first images (and their captions), for quick checks.
    """
    sims_list, t2i_ref = [], None
    for ckpt in checkpoints:
        sims, t2i, split_obj = checkpoint_similarities(ckpt, data, split, device, max_images=max_images)
        if t2i_ref is not None and not np.array_equal(t2i, t2i_ref):
            raise ValueError(f"{ckpt}: evaluates a different set of captions than the first checkpoint")
        t2i_ref = t2i
        sims_list.append(sims)
    sims = sims_list[0] if len(sims_list) == 1 else ensemble_sims(sims_list)
    metrics = evaluate_protocol(sims, t2i_ref, protocol)
    metrics["split"] = split_obj.name
    metrics["checkpoints"] = [str(resolve_checkpoint(c)) for c in checkpoints]
    return metrics
