"""The optimiser and its schedule: AdamW with the paper's parameter groups, the step learning rate,
and when the CNN starts to train."""

from __future__ import annotations

import torch

from ..config import RunConfig
from ..model import VSEModel
from ..model.vse import TEXT_EMBEDDINGS


def build_optimizer(model: VSEModel, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW with the paper's groups: heads at lr, CNN and text transformer at lr × their multipliers,
    and the pooling layers (``*.gpool.*``) at lr × ``pooling_lr_mult`` when that is not 1. InfoNCE's
    temperature trains with the heads."""
    t = cfg.train
    backbone, text_backbone, pooling, heads = [], [], [], []
    for name, p in model.named_parameters():
        if name.startswith("image.backbone."):
            if t.finetune_backbone:
                backbone.append(p)
        elif name.startswith("text.bert."):
            if t.finetune_text and (t.text_train_embeddings or not name.startswith(TEXT_EMBEDDINGS)):
                text_backbone.append(p)
        elif ".gpool." in name and t.pooling_lr_mult != 1.0:
            pooling.append(p)
        elif name != "logit_scale":
            heads.append(p)
    if model.logit_scale is not None:
        heads.append(model.logit_scale)  # last: where runs saved before the model owned it keep its moments
    groups = [{"params": heads, "lr": t.lr, "lr_mult": 1.0, "name": "heads"}]
    if backbone:
        groups.append({"params": backbone, "lr": t.lr * t.backbone_lr_mult, "lr_mult": t.backbone_lr_mult,
                       "name": "backbone"})
    if text_backbone:
        groups.append({"params": text_backbone, "lr": t.lr * t.text_backbone_lr_mult,
                       "lr_mult": t.text_backbone_lr_mult, "name": "text_backbone"})
    if pooling:
        groups.append({"params": pooling, "lr": t.lr * t.pooling_lr_mult, "lr_mult": t.pooling_lr_mult,
                       "name": "pooling"})
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)


def learning_rate(cfg: RunConfig, epoch: int) -> float:
    """The paper's step schedule: lr, then lr / 10 from ``lr_decay_epoch`` on."""
    return cfg.train.lr * (0.1 if epoch >= cfg.train.lr_decay_epoch else 1.0)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at ``lr`` × its multiplier (see :func:`build_optimizer`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def set_backbone_trainable(model: VSEModel, cfg: RunConfig, epoch: int) -> bool:
    """The CNN is frozen for ``freeze_backbone_epochs`` epochs, then fine-tuned (if asked to)."""
    if cfg.model.image_encoder != "grid":
        return False
    train_it = cfg.train.finetune_backbone and epoch >= cfg.train.freeze_backbone_epochs
    model.set_backbone_trainable(train_it)
    return train_it
