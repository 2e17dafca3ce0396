"""A minimal VSE trainer on the cached frozen features: the reference the project's recipe is held to.

Written independently of ``vseinf.train`` (it shares only the data readers and the metrics), so
that a gap between the two points at the project's recipe, not at the data. One Linear head and a
fixed pooling (max or average) per side, l2norm, VSE++ hinge (margin 0.2) summed over all
negatives in the first epoch and over the hardest one after, AdamW, step decay, fp32.

    python benchmarks/baseline_trainer.py --data ../data/flickr8k --pool max --seed 0 \
        --json results/baseline_trainer_max_seed0.json

The features are those ``vseinf extract --config configs/flickr8k.yaml`` caches (MobileNetV2 7×7
grids, MiniLM token outputs); they are built on first use.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from _report import emit  # benchmarks/_report.py

from vseinf.config import load_config
from vseinf.data import open_split
from vseinf.eval.metrics import retrieval_metrics
from vseinf.features import image_sets, text_sets
from vseinf.model import build_model


def padded(sets, n: int, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """All n items of a feature cache as one fp16 N × L × C tensor (zero padded) and the lengths."""
    parts, lengths = [], []
    for start in range(0, n, chunk):
        feats, lens = sets.batch(np.arange(start, min(n, start + chunk)))
        parts.append(feats.half())
        lengths.append(lens)
    width = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, 0, 0, width - p.shape[1])) for p in parts]), torch.cat(lengths)


def without_special_tokens(feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop each caption's first ([CLS]) and last valid ([SEP]) token; the rest move up one place."""
    keep = lengths - 2
    out = feats[:, 1:-1].clone()
    out[torch.arange(out.shape[1])[None, :] >= keep[:, None]] = 0  # the [SEP] now inside the width
    return out, keep


class Tower(nn.Module):
    """Linear → masked pooling → l2norm."""

    def __init__(self, in_dim: int, dim: int, pool: str, init: str):
        super().__init__()
        self.fc = nn.Linear(in_dim, dim)
        if init == "xavier":
            bound = math.sqrt(6.0 / (in_dim + dim))
            nn.init.uniform_(self.fc.weight, -bound, bound)
            nn.init.zeros_(self.fc.bias)
        self.pool = pool

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.fc(x.float())
        mask = (torch.arange(x.shape[1]) < lengths[:, None]).unsqueeze(2)
        if self.pool == "max":
            pooled = h.masked_fill(~mask, float("-inf")).amax(1)
        else:
            pooled = (h * mask).sum(1) / lengths[:, None].float()
        return F.normalize(pooled, dim=-1)


def hinge(img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor, hardest: bool, mask_same: bool,
          margin: float = 0.2) -> torch.Tensor:
    """VSE++ loss over a batch of pairs (row i of img matches row i of txt)."""
    scores = img @ txt.T
    pos = scores.diag()
    negative = ~torch.eye(len(ids), dtype=torch.bool)
    if mask_same:
        negative &= ids[:, None] != ids[None, :]
    cost_t = (margin + scores - pos[:, None]).clamp(min=0) * negative  # image anchors, caption negatives
    cost_i = (margin + scores - pos[None, :]).clamp(min=0) * negative  # caption anchors, image negatives
    if hardest:
        return cost_t.max(1).values.sum() + cost_i.max(0).values.sum()
    return cost_t.sum() + cost_i.sum()


@torch.no_grad()
def evaluate(img_tower, txt_tower, img, img_len, txt, txt_len, t2i) -> dict:
    img_tower.eval(), txt_tower.eval()
    ie = torch.cat([img_tower(img[i:i + 500], img_len[i:i + 500]) for i in range(0, len(img), 500)])
    te = torch.cat([txt_tower(txt[i:i + 500], txt_len[i:i + 500]) for i in range(0, len(txt), 500)])
    img_tower.train(), txt_tower.train()
    return retrieval_metrics(ie @ te.T, t2i)


def caption_order(cap2img: torch.Tensor, order: str, gen: torch.Generator) -> torch.Tensor:
    """The epoch's captions in training order (see --order); both orders use every caption once."""
    if order == "captions":
        return torch.randperm(len(cap2img), generator=gen)
    grouped = torch.randperm(len(cap2img), generator=gen)
    grouped = grouped[torch.argsort(cap2img[grouped], stable=True)]  # by photo, shuffled within one
    photo = cap2img[grouped]
    counts = torch.bincount(photo)
    rank = torch.arange(len(photo)) - (torch.cumsum(counts, 0) - counts)[photo]  # the caption's round
    photo_key = torch.rand(len(counts), generator=gen)[photo]  # photos in a new random order each epoch
    return grouped[torch.argsort(rank + photo_key)]  # round first (photo_key < 1), then the photos


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/flickr8k.yaml")
    p.add_argument("--data", help="dataset folder (default: the config's data.path)")
    p.add_argument("--pool", choices=["max", "avg"], default="max")
    p.add_argument("--init", choices=["default", "xavier"], default="default")
    p.add_argument("--mask-same-image", action="store_true", help="captions of one image are not negatives")
    p.add_argument("--no-special-tokens", action="store_true",
                   help="pool the caption's word pieces only, without [CLS] and [SEP]")
    p.add_argument("--order", choices=["captions", "images"], default="captions",
                   help="captions: every caption once an epoch, shuffled (vseinf's order); images: rounds "
                        "that take every photo once with one of its unused captions, so a batch never holds "
                        "a photo twice")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--decay-epoch", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args()

    cfg = load_config(args.config, [("data.path", args.data)] if args.data else [])
    model = build_model(cfg.model)  # only to find (or build) the feature caches
    train, dev = open_split(cfg.data.path, "train"), open_split(cfg.data.path, "dev")
    tr_img, tr_img_len = padded(image_sets(model, train), train.n_images)
    tr_txt, tr_txt_len = padded(text_sets(model, train), train.n_captions)
    dv_img, dv_img_len = padded(image_sets(model, dev), dev.n_images)
    dv_txt, dv_txt_len = padded(text_sets(model, dev), dev.n_captions)
    cap2img = torch.as_tensor(np.asarray(train.caption_to_image))
    if args.no_special_tokens:  # the cache holds [CLS] w1 … wn [SEP]: keep w1 … wn
        tr_txt, tr_txt_len = without_special_tokens(tr_txt, tr_txt_len)
        dv_txt, dv_txt_len = without_special_tokens(dv_txt, dv_txt_len)
    del model

    torch.manual_seed(args.seed)
    img_tower = Tower(tr_img.shape[2], cfg.model.embed_dim, args.pool, args.init)
    txt_tower = Tower(tr_txt.shape[2], cfg.model.embed_dim, args.pool, args.init)
    params = list(img_tower.parameters()) + list(txt_tower.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    history, best, start = [], None, time.time()
    for epoch in range(args.epochs):
        for group in opt.param_groups:
            group["lr"] = args.lr * (0.1 if epoch >= args.decay_epoch else 1.0)
        order = caption_order(cap2img, args.order, gen)
        losses = []
        for s in range(len(order) // args.batch_size):
            caps = order[s * args.batch_size:(s + 1) * args.batch_size]
            ids = cap2img[caps]
            ie = img_tower(tr_img[ids], tr_img_len[ids])
            te = txt_tower(tr_txt[caps], tr_txt_len[caps])
            loss = hinge(ie, te, ids, hardest=epoch > 0, mask_same=args.mask_same_image)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 2.0)
            opt.step()
            losses.append(float(loss.detach()))
        metrics = evaluate(img_tower, txt_tower, dv_img, dv_img_len, dv_txt, dv_txt_len, dev.caption_to_image)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "rsum": metrics["rsum"]})
        if best is None or metrics["rsum"] > best["rsum"]:  # picked on dev, as vseinf train does
            best = dict(metrics, epoch=epoch + 1)
        print(f"epoch {epoch + 1}: loss {np.mean(losses):.2f}  dev rsum {metrics['rsum']:.1f}", flush=True)
    emit({"benchmark": "baseline_trainer", "config": vars(args), "history": history,
          "final": best, "last": metrics, "wall_s": round(time.time() - start, 1)}, args.json)


if __name__ == "__main__":
    main()
