"""The training loop: AdamW, the paper's schedule, validation RSUM each epoch, best/last checkpoints.

    vseinf train --config configs/flickr8k.yaml --out runs/f8k         # or
    torchrun --nproc_per_node 2 -m vseinf train --config … --out …

A run directory holds ``config.json`` (the full config), ``best/`` (the checkpoint with the highest
validation RSUM), ``last/`` (the latest state, with optimizer moments and counters, written
atomically every ``save_every`` steps and at each epoch's end), ``log.jsonl`` and ``training.png``.
``--resume`` continues a killed run from ``last/``: same batches, same schedule.

Each side of a batch is either read from a feature cache (frozen backbone: grid vectors, or token
outputs of a frozen transformer; and precomputed region/frame sets) or computed live (fine-tuned
CNN on images, BiGRU or fine-tuned transformer on tokens).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import load_checkpoint, load_trainer_state, optimizer_from_flat, optimizer_to_flat
from .config import RunConfig
from .data.splits import CaptionSplit, open_split
from .distributed import World, in_turns, init_distributed
from .evaluate import evaluate_split
from .features import uses_image_cache, uses_text_cache
from .losses import VSELoss, gather_batch
from .model import VSEModel, build_model, save_model
from .precision import autocast, resolve_precision



def _device(world: World) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Data


def load_splits(cfg: RunConfig) -> tuple[CaptionSplit, CaptionSplit]:
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


def image_side(model: VSEModel, split: CaptionSplit, cfg: RunConfig, progress: bool) -> Side:
    from .features import image_sets

    if uses_image_cache(cfg):
        return Side("sets", image_sets(model, split, num_workers=cfg.data.num_workers, progress=progress), split)
    return Side("images", split=split)


def text_side(model: VSEModel, split: CaptionSplit, cfg: RunConfig, progress: bool) -> Side:
    from .features import text_sets

    if uses_text_cache(cfg):
        return Side("sets", text_sets(model, split, progress=progress), split)
    return Side("tokens", split=split)


def live_images(model: VSEModel, split: CaptionSplit, train: bool, batches, num_workers: int, device,
                seed_key=None, first_step: int = 0):
    """An iterator over ``(pixels | None, kept positions)`` for each batch of image indices (live
    CNN path): worker processes decode ahead; unreadable images are dropped from their batch."""
    from .data.images import ImageBatches, ImageDataset, image_batch_loader

    dataset = ImageDataset(split, model.image_transform(train=train))
    return iter(image_batch_loader(ImageBatches(dataset, batches, seed_key, first_step), num_workers,
                                   pin_memory=torch.device(device).type == "cuda"))


def embed_images(model: VSEModel, side: Side, image_indices, device, live=None):
    """Image embeddings of ``image_indices``; returns (embeddings, kept positions). Live images
    come, already decoded, from ``live`` (see :func:`live_images`)."""
    if side.kind == "sets":
        feats, lengths = side.source.batch(image_indices)
        emb, _ = model.embed_image_features(feats.to(device), lengths.to(device))
        return emb, list(range(len(image_indices)))
    pixels, keep = next(live)
    if pixels is None:
        return None, keep
    emb, _ = model.image(pixels.to(device, non_blocking=True))
    return emb, keep


def embed_captions(model: VSEModel, side: Side, caption_indices, device, augment: bool,
                   rng: random.Random | None = None, generator: torch.Generator | None = None):
    if side.kind == "sets":
        feats, lengths = side.source.batch(caption_indices)
        feats, lengths = feats.to(device), lengths.to(device)
        if augment and model.config.size_augment:
            from .encoders.text import drop_token_features

            feats, lengths = drop_token_features(feats, lengths, generator=generator)
        emb, _ = model.embed_text_features(feats, lengths)
        return emb
    texts = [side.split.captions[int(j)] for j in caption_indices]
    if augment and model.config.text_augment:
        ids, lengths = _augmented_tokens(model, texts, rng or random.Random())
    else:
        ids, lengths = model.tokenize(texts)
    emb, _ = model.embed_tokens(ids.to(device), lengths.to(device))
    return emb


def _augmented_tokens(model: VSEModel, texts, rng: random.Random):
    from .encoders.text import augment_tokens, pad_token_ids

    if model.config.text_encoder == "transformer":
        enc = model.text
        seqs = [enc.encode_ids(t, model.config.max_text_length) for t in texts]
        special, mask_id, vocab_size = enc.special_ids, enc.mask_id, enc.vocab_size
    else:
        vocab = model.vocab
        seqs = [vocab.encode(t) for t in texts]
        special, mask_id, vocab_size = vocab.special_ids, vocab.mask_id, len(vocab)
    seqs = [augment_tokens(s, mask_id, vocab_size, rng, special_ids=special) for s in seqs]
    return pad_token_ids(seqs, 0)


# ---------------------------------------------------------------------------------------------
# Optimisation


def build_optimizer(model: VSEModel, loss_fn: VSELoss, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW with the paper's groups: heads at lr, CNN and text transformer at lr × their multipliers,
    and the pooling layers (``*.gpool.*``) at lr × ``pooling_lr_mult`` when that is not 1."""
    t = cfg.train
    backbone, text_backbone, pooling, heads = [], [], [], []
    for name, p in model.named_parameters():
        if name.startswith("image.backbone."):
            if t.finetune_backbone:
                backbone.append(p)
        elif name.startswith("text.bert."):
            if t.finetune_text:
                text_backbone.append(p)
        elif ".gpool." in name and t.pooling_lr_mult != 1.0:
            pooling.append(p)
        else:
            heads.append(p)
    heads += list(loss_fn.parameters())
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


def set_backbone_trainable(model: VSEModel, cfg: RunConfig, epoch: int) -> bool:
    """The CNN is frozen for ``freeze_backbone_epochs`` epochs, then fine-tuned (if asked to)."""
    if cfg.model.image_encoder != "grid":
        return False
    train_it = cfg.train.finetune_backbone and epoch >= cfg.train.freeze_backbone_epochs
    model.image.set_backbone_trainable(train_it)
    return train_it


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


# ---------------------------------------------------------------------------------------------
# The loop


def _log(path: Path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def plot_history(run_dir: Path) -> Path | None:
    """Loss per step and validation RSUM per epoch from ``log.jsonl`` → ``training.png``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps, losses, epochs, rsums = [], [], [], []
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            steps.append(rec["step"])
            losses.append(rec["loss"])
        if "val" in rec:
            epochs.append(rec["epoch"] + 1)
            rsums.append(rec["val"]["rsum"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(steps, losses, lw=1)
    a1.set_xlabel("step")
    a1.set_ylabel("training loss")
    a1.set_title("loss")
    a2.plot(epochs, rsums, marker="o")
    a2.set_xlabel("epoch")
    a2.set_ylabel("validation RSUM")
    a2.set_title("validation RSUM")
    fig.tight_layout()
    out = run_dir / "training.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a run to resume (``last/``, or the copy a save in progress keeps)."""
    run_dir = Path(run_dir)
    return (run_dir / "last").exists() or (run_dir / ".last.old").exists()


def train(cfg: RunConfig, run_dir: str | Path, resume: bool | str = False, progress: bool = True) -> dict:
    """Train a VSE∞ model; returns the best validation metrics.

    Args:
        cfg: the run's full config.
        run_dir: output directory (created).
        resume: continue from ``run_dir/last``; ``"auto"``: continue if that checkpoint exists,
            else start (a restarted job runs the same command each time).
        progress: show progress bars.
    """
    world = init_distributed()
    device = _device(world)
    run_dir = Path(run_dir)
    progress = progress and world.main
    t = cfg.train
    if resume == "auto":
        resume = has_checkpoint(run_dir)
        if world.main and not resume and (run_dir / "log.jsonl").exists():
            (run_dir / "log.jsonl").unlink()  # a run killed before its first checkpoint starts over
        if world.size > 1:
            dist.barrier()  # nobody reads the folder while rank 0 clears it
    if resume:
        if not has_checkpoint(run_dir):
            raise ValueError(f"{run_dir}: nothing to resume (no last/ checkpoint); '--resume auto' starts "
                             "a run that has none")
        saved = json.loads((run_dir / "config.json").read_text())
        from .config import config_from_dict

        cfg = config_from_dict({k: saved[k] for k in ("model", "data", "train")}, str(run_dir / "config.json"))
        t = cfg.train
    elif (run_dir / "last").exists():
        raise ValueError(f"{run_dir} already holds a run; use --resume (or --resume auto) to continue it or "
                         "choose another --out")
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)
    train_split, val_split = load_splits(cfg)
    vocab = None
    if cfg.model.text_encoder == "bigru":
        from .encoders.text import Vocabulary

        if resume:
            vocab = json.loads((run_dir / "last" / "config.json").read_text()).get("text.vocab")
        else:
            vocab = Vocabulary.build(train_split.captions).words
    model = build_model(cfg.model, vocab=vocab).to(device)
    if cfg.model.text_encoder == "bigru" and cfg.model.glove and not resume:
        model.text.init_from_glove(model.vocab)
    if world.main:
        print(f"train: {train_split.n_images} images, {train_split.n_captions} captions; "
              f"val: {val_split.n_images} images, {val_split.n_captions} captions")

    def open_sides():
        return (image_side(model, train_split, cfg, progress), text_side(model, train_split, cfg, progress),
                image_side(model, val_split, cfg, progress), text_side(model, val_split, cfg, progress))

    tr_img, tr_txt, va_img, va_txt = in_turns(world, device, open_sides, "building the feature caches")

    torch.manual_seed(t.seed + world.rank)  # ranks draw different augmentations
    loss_fn = VSELoss(t.loss, t.margin).to(device)
    optimizer = build_optimizer(model, loss_fn, cfg)
    if world.size > 1:
        # Same starting point on every rank; gradients are then all-reduced after each backward.
        for tensor in list(model.state_dict().values()) + list(loss_fn.state_dict().values()):
            dist.broadcast(tensor, 0)

    # Captions whose image is unreadable never enter a batch.
    usable_caps = np.arange(train_split.n_captions)
    if tr_img.kind == "sets" and tr_img.source.broken.any():
        usable_caps = usable_caps[~tr_img.source.broken[train_split.caption_to_image]]

    text_rng = random.Random(t.seed * 1000 + world.rank)
    aug_gen = torch.Generator().manual_seed(t.seed + 7919 * world.rank)
    rngs = (text_rng, aug_gen)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_rsum": -1.0, "best_epoch": -1}
    if resume:
        state = _restore(run_dir, model, loss_fn, optimizer, device, rngs, world)
        if world.main:
            print(f"resuming {run_dir} at epoch {state['epoch'] + 1}, step {state['step_in_epoch']}")
    amp = autocast(t.precision, device)
    if world.main and t.precision == "auto":
        print(f"precision auto: {resolve_precision(t.precision, device)} on {device.type}")
    log_path = run_dir / "log.jsonl"

    for epoch in range(state["epoch"], t.epochs):
        backbone_training = set_backbone_trainable(model, cfg, epoch)
        lr = learning_rate(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        order = epoch_order(len(usable_caps), t.seed, epoch, world, t.batch_size)
        steps = len(order) // t.batch_size
        if t.max_steps_per_epoch:
            steps = min(steps, t.max_steps_per_epoch)
        warmup = epoch < t.warmup_epochs
        model.train()
        step_caps = [usable_caps[order[s * t.batch_size:(s + 1) * t.batch_size]] for s in range(steps)]
        live = None
        if tr_img.kind == "images":
            # Crops are seeded by (seed, rank, epoch, step): the same for any worker count, and on resume.
            batches = [train_split.caption_to_image[caps] for caps in step_caps[state["step_in_epoch"]:]]
            live = live_images(model, train_split, True, batches, cfg.data.num_workers, device,
                               seed_key=(t.seed, world.rank, epoch), first_step=state["step_in_epoch"])
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, initial=state["step_in_epoch"], desc=f"epoch {epoch + 1}/{t.epochs}", unit="step")
        run_loss, run_n, t0 = 0.0, 0, time.time()
        for step in range(state["step_in_epoch"], steps):
            caps = step_caps[step]
            imgs = train_split.caption_to_image[caps]
            with amp:
                img_emb, keep = embed_images(model, tr_img, imgs, device, live)
                if _any_rank_skips(img_emb is None, world, live is not None, device):
                    continue
                caps_k, imgs_k = caps[keep], imgs[keep]
                txt_emb = embed_captions(model, tr_txt, caps_k, device, augment=True, rng=text_rng,
                                         generator=aug_gen)
            img_all, txt_all, ids_all, rows = gather_batch(img_emb.float(), txt_emb.float(),
                                                           torch.as_tensor(imgs_k, device=device))
            loss = loss_fn(img_all, txt_all, ids_all, warmup=warmup, local_rows=rows)
            if backbone_training and epoch == t.freeze_backbone_epochs:
                # The authors ramp the loss from 0 to 1 over the CNN's first training epoch.
                loss = loss * min(1.0, (step + 1) / steps)
            optimizer.zero_grad(set_to_none=True)
            (loss * world.size).backward()
            if world.size > 1:
                _allreduce_grads(model, loss_fn, world)
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], t.grad_clip)
            optimizer.step()
            state["global_step"] += 1
            state["step_in_epoch"] = step + 1
            run_loss += float(loss.detach())
            run_n += 1
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{run_loss / run_n:.3f}")
            if world.main and (state["global_step"] % t.log_every == 0):
                _log(log_path, {"step": state["global_step"], "epoch": epoch, "loss": run_loss / run_n, "lr": lr,
                                "sec_per_step": (time.time() - t0) / run_n})
                run_loss, run_n, t0 = 0.0, 0, time.time()
            # Every rank takes part (each hands rank 0 its RNG streams); only rank 0 writes.
            if t.save_every and state["global_step"] % t.save_every == 0 and step + 1 < steps:
                _save_last(model, loss_fn, optimizer, cfg, run_dir, dict(state, epoch=epoch), rngs, world)
        if bar:
            bar.close()
        if world.main and run_n:
            _log(log_path, {"step": state["global_step"], "epoch": epoch, "loss": run_loss / run_n, "lr": lr,
                            "sec_per_step": (time.time() - t0) / run_n})
        state["epoch"], state["step_in_epoch"] = epoch + 1, 0
        if world.main and ((epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs):
            metrics = evaluate_split(model, va_img, va_txt, device, cfg.data.num_workers)
            metrics["epoch"] = epoch + 1
            _log(log_path, {"epoch": epoch, "val": metrics})
            print(f"epoch {epoch + 1}: val rsum {metrics['rsum']:.1f} "
                  f"(i2t R@1 {metrics['i2t_r1']:.1f}, t2i R@1 {metrics['t2i_r1']:.1f})", flush=True)
            if metrics["rsum"] > state["best_rsum"]:
                state["best_rsum"], state["best_epoch"] = metrics["rsum"], epoch + 1
                save_model(model, run_dir / "best", cfg, metrics)
            plot_history(run_dir)
        _save_last(model, loss_fn, optimizer, cfg, run_dir, state, rngs, world)
        if world.size > 1:
            dist.barrier()

    best = None
    if world.main:
        best_dir = run_dir / "best"
        best = json.loads((best_dir / "metrics.json").read_text()) if (best_dir / "metrics.json").exists() else {}
        (run_dir / "metrics.json").write_text(json.dumps(best, indent=2) + "\n")
    return best


def _any_rank_skips(skip: bool, world: World, can_skip: bool, device) -> bool:
    """Whether this step is skipped (no readable image in the batch). Under DDP every rank must skip
    together, or the ranks' collectives fall out of step; only live image batches can be empty."""
    if world.size == 1 or not can_skip:
        return skip
    flag = torch.tensor([1.0 if skip else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


GRAD_BUCKET_ELEMENTS = 1 << 23  # 32 MB of fp32 per all-reduce


def _grad_buckets(grads: list[torch.Tensor], cap: int = GRAD_BUCKET_ELEMENTS) -> list[list[torch.Tensor]]:
    """Consecutive gradients of one dtype and device, grouped up to ``cap`` elements (a larger
    tensor is a bucket of its own)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        last = buckets[-1] if buckets else None
        if last is None or size + g.numel() > cap or (g.dtype, g.device) != (last[0].dtype, last[0].device):
            buckets.append([g])
            size = g.numel()
        else:
            last.append(g)
            size += g.numel()
    return buckets


def _allreduce_grads(model, loss_fn, world: World):
    """Average gradients across ranks (each rank's loss covers only its own anchor rows). Gradients
    travel in a few flat buckets: one collective per parameter tensor costs a round trip each."""
    grads = [p.grad for p in list(model.parameters()) + list(loss_fn.parameters()) if p.grad is not None]
    for bucket in _grad_buckets(grads):
        if len(bucket) == 1:
            dist.all_reduce(bucket[0])
            bucket[0].div_(world.size)
            continue
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat.div_(world.size)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _save_last(model, loss_fn, optimizer, cfg, run_dir: Path, state: dict, rngs, world: World):
    """Everything a resumed run needs to continue exactly: weights, optimizer, counters, RNG states.

    Called on every rank: the ranks draw different augmentations, so each one's RNG streams are
    gathered to rank 0, which alone writes ``last/`` (rank r > 0's as ``rng.torch.r``,
    ``rng.augment.r`` and ``text_rng_ranks[r]``; rank 0's under the single-process names).
    """
    text_rng, aug_gen = rngs
    # The GPU's RNG too: dropout in a fine-tuned text transformer draws from it.
    cuda_state = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    mine = (torch.get_rng_state(), aug_gen.get_state(), _jsonable(text_rng.getstate()), cuda_state)
    streams = [mine]
    if world.size > 1:
        # In-process exchange between the ranks of one job (nothing untrusted is unpickled).
        # all_gather, not gather: every backend has it (nccl has long lacked gather_object).
        streams = [None] * world.size
        dist.all_gather_object(streams, mine)
    if not world.main:
        return
    tensors, opt_state = optimizer_to_flat(optimizer)
    for k, v in loss_fn.state_dict().items():
        tensors[f"loss.{k}"] = v
    tensors["rng.torch"], tensors["rng.augment"], text_state, cuda_state = streams[0]
    if cuda_state is not None:
        tensors["rng.cuda"] = cuda_state
    extra = {"optimizer": opt_state, "state": state, "text_rng": text_state, "world_size": world.size}
    if world.size > 1:
        for r, (torch_state, aug_state, _, cuda_state) in enumerate(streams[1:], start=1):
            tensors[f"rng.torch.{r}"], tensors[f"rng.augment.{r}"] = torch_state, aug_state
            if cuda_state is not None:
                tensors[f"rng.cuda.{r}"] = cuda_state
        extra["text_rng_ranks"] = {str(r): streams[r][2] for r in range(1, world.size)}
    save_model(model, run_dir / "last", cfg, None, (tensors, extra))


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


def _restore(run_dir: Path, model, loss_fn, optimizer, device, rngs, world: World) -> dict:
    state_dict, _, _ = load_checkpoint(run_dir / "last")
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected:
        raise ValueError(f"{run_dir / 'last'}: unexpected tensors {unexpected[:5]}")
    tensors, saved = load_trainer_state(run_dir / "last")
    loss_fn.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("loss.")})
    # Left on the CPU: load_state_dict moves the moments to their parameters' device and keeps
    # AdamW's step counters on the host, where the optimizer wants them (a GPU counter would cost a
    # synchronisation per parameter and step).
    optimizer_from_flat(optimizer, {k: v for k, v in tensors.items() if k.startswith("optim.")},
                        saved["optimizer"])
    text_rng, aug_gen = rngs
    suffix = f".{world.rank}" if world.rank else ""
    text_state = saved["text_rng"] if not world.rank else saved.get("text_rng_ranks", {}).get(str(world.rank))
    if f"rng.torch{suffix}" in tensors and text_state is not None:
        torch.set_rng_state(tensors[f"rng.torch{suffix}"])
        aug_gen.set_state(tensors[f"rng.augment{suffix}"])
        text_rng.setstate(_tupled(text_state))
        if torch.device(device).type == "cuda" and f"rng.cuda{suffix}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda{suffix}"])
    else:
        # Saved by a run with fewer processes: this rank keeps its freshly seeded streams (taking
        # rank 0's would make two ranks draw the same augmentations); the rest resumes exactly.
        print(f"rank {world.rank}: {run_dir / 'last'} holds no RNG state for this rank "
              f"(saved with {saved.get('world_size', 1)} process(es)); augmentations restart from the seed",
              flush=True)
    return saved["state"]
