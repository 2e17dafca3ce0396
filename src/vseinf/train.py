"""The training loop: AdamW, the paper's schedule, validation RSUM each epoch, best/last checkpoints.

    vseinf train --config configs/flickr8k.yaml --out runs/f8k         # or
    torchrun --nproc_per_node 2 -m vseinf train --config … --out …

A run directory holds ``config.json`` (the full config), ``best/`` (the checkpoint with the highest
validation RSUM), ``last/`` (the latest state, with optimizer moments and counters, written
atomically every ``save_every`` steps and at each epoch's end), ``log.jsonl`` and ``training.png``.
``--resume`` continues a killed run from ``last/``: same batches, same schedule, and on the same
machine the same weights bit for bit (a fixed CPU thread count, deterministic kernels).

Each side of a batch is either read from a feature cache (frozen backbone: grid vectors, or token
outputs of a frozen transformer; and precomputed region/frame sets) or computed live (fine-tuned
CNN on images, BiGRU or fine-tuned transformer on tokens). The model tells the two apart by the
input's shape (see :meth:`vseinf.model.VSEModel.forward`).

Under torchrun the model is wrapped in DistributedDataParallel (gloo on CPUs, nccl on GPUs), which
averages the gradients across ranks during the backward pass. Every rank embeds its share of the
global batch, gathers the others' embeddings with their gradients and computes the loss of the
whole global batch, so hardest negatives are global and two processes train like one process on
the concatenated batch (see :mod:`vseinf.losses`).
"""

from __future__ import annotations

import json
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import (load_checkpoint, load_trainer_state, optimizer_from_flat, optimizer_to_flat,
                         upgrade_state_dict)
from .config import RunConfig, config_from_dict
from .data.splits import CaptionSplit, open_split, resolve_data_path
from .distributed import World, in_turns, init_distributed
from .eval import evaluate_split
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

    @property
    def cached(self) -> bool:
        """Inputs are read from a feature cache (else decoded or tokenized from the split)."""
        return self.source is not None



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
            from .encoders.text import drop_token_features

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


def embed_captions(model: VSEModel, side: Side, caption_indices, device, augment: bool,
                   rng: random.Random | None = None, generator: torch.Generator | None = None):
    return model.embed_texts(*caption_inputs(model, side, caption_indices, device, augment, rng, generator))



# ---------------------------------------------------------------------------------------------
# Optimisation


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
            if t.finetune_text:
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


def set_backbone_trainable(model: VSEModel, cfg: RunConfig, epoch: int) -> bool:
    """The CNN is frozen for ``freeze_backbone_epochs`` epochs, then fine-tuned (if asked to)."""
    if cfg.model.image_encoder != "grid":
        return False
    train_it = cfg.train.finetune_backbone and epoch >= cfg.train.freeze_backbone_epochs
    model.set_backbone_trainable(train_it)
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




def distributed_model(model: VSEModel, world: World, device: torch.device) -> nn.Module:
    """The model as the training step calls it: under torchrun, wrapped in DistributedDataParallel,
    which averages the gradients across ranks during the backward pass.

    DDP covers the parameters that require gradients when it is built: build a new wrapper when
    that set changes (see :meth:`TrainingRun.replicate`). Within one wrapper the graph is static
    (``static_graph``): DDP learns in the first step which trained parameters never get a gradient
    (a transformer's unused pooler, a BatchNorm the authors' forward skips) instead of searching
    the graph every step.
    """
    if world.size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   static_graph=True)


MAX_AUTO_THREADS = 8


def thread_count(setting: int) -> int:
    """CPU threads for a run: ``train.num_threads``, or for 0, $OMP_NUM_THREADS when set (torchrun
    sets 1 when it starts several processes a machine), else the cores this process may use shared
    among the machine's training processes, at most MAX_AUTO_THREADS."""
    if setting < 0:
        raise ValueError(f"train.num_threads: expected 0 (automatic) or a number of threads, got {setting}")
    if setting:
        return setting
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_AUTO_THREADS, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


@contextmanager
def reproducible(num_threads: int):
    """A fixed CPU thread count and deterministic kernels while a run trains; the process's own
    settings come back after. CPU sums are split by thread, so the count decides their order
    (vseinf also turns MKL's load-dependent thread choice off when it is imported). Ops that torch
    cannot run deterministically (some CUDA scatters) warn once, naming themselves, rather than fail.
    """
    import torch.utils.deterministic as deterministic

    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(), deterministic.fill_uninitialized_memory)
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Nothing reads uninitialised memory here; filling every new tensor would only cost time.
    deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])
        deterministic.fill_uninitialized_memory = before[3]


# ---------------------------------------------------------------------------------------------
# The loop


def _log(path: Path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def objective_name(loss_kind: str, warmup: bool) -> str:
    """What the logged loss is, in words: the hinge loss changes meaning after the warm-up epoch."""
    if loss_kind == "hinge":
        return "hinge, all negatives (warm-up)" if warmup else "hinge, hardest negative"
    return loss_kind


def _read_log(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """The loss records and the validation records of ``log.jsonl``.

    Records written before the log said which loss it reports (epochs counted from 0, the batch
    loss only) are read in today's terms, from the run's ``config.json``: epochs from 1, the
    objective of their epoch, the loss per pair.
    """
    train_cfg = {}
    if (run_dir / "config.json").is_file():
        train_cfg = json.loads((run_dir / "config.json").read_text()).get("train", {})
    kind, warmup = train_cfg.get("loss", "hinge"), train_cfg.get("warmup_epochs", 1)
    losses, vals = [], []
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            if "objective" not in rec:  # an older record
                rec = dict(rec, epoch=rec["epoch"] + 1, objective=objective_name(kind, rec["epoch"] < warmup))
                if kind == "hinge":
                    rec["loss_per_pair"] = rec["loss"] / train_cfg.get("batch_size", 1)
            losses.append(rec)
        if "val" in rec:
            vals.append(dict(rec, epoch=rec["val"].get("epoch", rec["epoch"])))
    return losses, vals


def plot_history(run_dir: Path, out: Path | None = None) -> Path | None:
    """``training.png`` from ``log.jsonl``: the loss per pair and the validation RSUM.

    The hinge loss sums over every negative during the warm-up epoch and takes only the hardest
    one afterwards, so the two differ by about the batch size; one axis would show a spike and a
    flat line. The warm-up gets a panel of its own, the hardest-negative epochs another (its scale
    shows them), and every panel marks where the learning rate drops. ``out`` defaults to
    ``run_dir/training.png``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    losses, vals = _read_log(run_dir)

    def per_pair(rec):
        return rec.get("loss_per_pair", rec["loss"])

    groups: dict[str, list[dict]] = {}
    for rec in losses:
        groups.setdefault(rec.get("objective", "loss"), []).append(rec)
    # The step and the epoch where the learning rate first drops (the paper's ÷ 10).
    decay_step = decay_epoch = None
    for prev, rec in zip(losses, losses[1:]):
        if rec.get("lr", 0) < prev.get("lr", 0) * 0.999 and rec.get("epoch") != prev.get("epoch"):
            decay_step, decay_epoch = prev["step"], prev["epoch"] + 0.5
            break

    def mark_decay(ax, x):
        if x is not None:
            ax.axvline(x, color="tab:red", ls="--", lw=1, label="lr ÷ 10")

    panels = len(groups) + 1
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.8), squeeze=False)
    axes = axes[0]
    for ax, (objective, recs) in zip(axes, groups.items()):
        steps = [r["step"] for r in recs]
        ax.plot(steps, [per_pair(r) for r in recs], lw=1.2, marker="." if len(recs) < 40 else None)
        epochs = sorted({r["epoch"] for r in recs if "epoch" in r})
        where = f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}–{epochs[-1]}" if epochs else ""
        ax.set_title(f"{objective}: {where}" if where else objective, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss per pair")
        if decay_step is not None and steps and steps[0] <= decay_step <= steps[-1]:
            mark_decay(ax, decay_step)
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    ax.plot([r["epoch"] for r in vals], [r["val"]["rsum"] for r in vals], marker="o")
    mark_decay(ax, decay_epoch)
    if decay_epoch is not None:
        ax.legend(fontsize=8)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("validation RSUM")
    ax.set_title("validation RSUM", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "training.png"
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
    run_dir = Path(run_dir)
    cfg, resume = _open_run_dir(cfg, run_dir, resume, world)
    with reproducible(thread_count(cfg.train.num_threads)):
        run = start_run(cfg, run_dir, resume, world, progress and world.main)
        for epoch in range(run.state["epoch"], cfg.train.epochs):
            train_one_epoch(run, epoch)
            _end_epoch(run, epoch)
    best = None
    if world.main:
        best_dir = run_dir / "best"
        best = json.loads((best_dir / "metrics.json").read_text()) if (best_dir / "metrics.json").exists() else {}
        (run_dir / "metrics.json").write_text(json.dumps(best, indent=2) + "\n")
    return best


def _open_run_dir(cfg: RunConfig, run_dir: Path, resume: bool | str, world: World) -> tuple[RunConfig, bool]:
    """Decide between a new run and a resumed one; returns the config in force (a resumed run's is
    the one it saved) and whether to resume. Rank 0 writes ``config.json``."""
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
        cfg = config_from_dict({k: saved[k] for k in ("model", "data", "train")}, str(run_dir / "config.json"))
    elif (run_dir / "last").exists():
        raise ValueError(f"{run_dir} already holds a run; use --resume (or --resume auto) to continue it or "
                         "choose another --out")
    if cfg.data.path:  # stored resolved: `vseinf eval --checkpoint RUN` works from any folder
        cfg.data.path = resolve_data_path(cfg.data.path, "data.path" if not resume else
                                          f"data.path of {run_dir / 'config.json'}")
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return cfg, bool(resume)


@dataclass
class TrainingRun:
    """A run in progress: what its epochs share."""

    cfg: RunConfig
    run_dir: Path
    world: World
    device: torch.device
    model: VSEModel
    loss_fn: VSELoss
    optimizer: torch.optim.Optimizer
    split: CaptionSplit  # the training split
    sides: tuple[Side, Side, Side, Side]  # train images, train captions, val images, val captions
    usable_caps: np.ndarray  # captions whose image is readable
    rngs: tuple[random.Random, torch.Generator]  # caption augmentation: tokens, cached token outputs
    state: dict  # epoch, step_in_epoch, global_step, best_rsum, best_epoch
    progress: bool
    replicas: nn.Module | None = None  # the model as the step calls it (see distributed_model)
    replicated: tuple[str, ...] = ()  # the trainable parameters ``replicas`` was built for
    epoch_loss: str = ""  # the last epoch's mean loss per pair, in words, for the console

    def replicate(self) -> nn.Module:
        """The model wrapped for this epoch: a new DDP wrapper when the trainable parameters changed
        (the CNN is unfrozen after ``freeze_backbone_epochs``), the current one otherwise."""
        trainable = tuple(name for name, p in self.model.named_parameters() if p.requires_grad)
        if self.replicas is None or trainable != self.replicated:
            self.replicas = None  # the old wrapper, and the gradient hooks it set, go first
            self.replicas, self.replicated = distributed_model(self.model, self.world, self.device), trainable
        return self.replicas


def start_run(cfg: RunConfig, run_dir: Path, resume: bool, world: World, progress: bool) -> TrainingRun:
    """Seeds, data, model (restored from ``last/`` when resuming), feature caches and optimizer."""
    t = cfg.train
    device = _device(world)
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
    model = build_model(cfg, vocab=vocab).to(device)
    if cfg.model.text_encoder == "bigru" and cfg.model.glove and not resume:
        model.text.init_from_glove(model.vocab)
    if world.main:
        items = "videos" if cfg.model.image_encoder == "frames" else "images"
        print(f"train: {train_split.n_images} {items}, {train_split.n_captions} captions; "
              f"val: {val_split.n_images} {items}, {val_split.n_captions} captions")

    def open_sides():
        return tuple(side(model, split, cfg, progress) for split in (train_split, val_split)
                     for side in (image_side, text_side))

    sides = in_turns(world, device, open_sides, "building the feature caches")
    torch.manual_seed(t.seed + world.rank)  # ranks draw different augmentations
    usable_caps = np.arange(train_split.n_captions)  # captions whose image is unreadable never enter a batch
    if sides[0].cached and sides[0].source.broken.any():
        usable_caps = usable_caps[~sides[0].source.broken[train_split.caption_to_image]]
    rngs = (random.Random(t.seed * 1000 + world.rank), torch.Generator().manual_seed(t.seed + 7919 * world.rank))
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_rsum": -1.0, "best_epoch": -1}
    run = TrainingRun(cfg, run_dir, world, device, model, VSELoss(t.loss, t.margin).to(device),
                      build_optimizer(model, cfg), train_split, sides, usable_caps, rngs, state, progress)
    if resume:
        run.state = _restore(run)
        if world.main:
            print(f"resuming {run_dir} at epoch {run.state['epoch'] + 1}, step {run.state['step_in_epoch']}")
    if world.main and t.precision == "auto":
        print(f"precision auto: {resolve_precision(t.precision, device)} on {device.type}")
    if world.main and t.loss == "hinge" and t.warmup_epochs and run.state["epoch"] < t.warmup_epochs:
        first = "epoch 1 is" if t.warmup_epochs == 1 else f"epochs 1–{t.warmup_epochs} are"
        print(f"loss: hinge, per pair; {first} a warm-up that sums over all negatives, later epochs take only "
              "the hardest one (a loss about the batch size smaller)")
    return run


def train_one_epoch(run: TrainingRun, epoch: int) -> None:
    """The steps of one epoch, from ``run.state["step_in_epoch"]`` on (mid-epoch after a resume);
    the resumable ``last/`` checkpoint is written every ``save_every`` steps."""
    cfg, t, world, state = run.cfg, run.cfg.train, run.world, run.state
    backbone_training = set_backbone_trainable(run.model, cfg, epoch)
    model = run.replicate()
    lr = learning_rate(cfg, epoch)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    order = epoch_order(len(run.usable_caps), t.seed, epoch, world, t.batch_size)
    steps = len(order) // t.batch_size
    if t.max_steps_per_epoch:
        steps = min(steps, t.max_steps_per_epoch)
    step_caps = [run.usable_caps[order[s * t.batch_size:(s + 1) * t.batch_size]] for s in range(steps)]
    live = None
    if not run.sides[0].cached:
        # Crops are seeded by (seed, rank, epoch, step): the same for any worker count, and on resume.
        batches = [run.split.caption_to_image[caps] for caps in step_caps[state["step_in_epoch"]:]]
        live = live_images(run.model, run.split, True, batches, cfg.data.num_workers, run.device,
                           seed_key=(t.seed, world.rank, epoch), first_step=state["step_in_epoch"])
    # The authors ramp the loss from 0 to 1 over the CNN's first training epoch.
    ramp = backbone_training and epoch == t.freeze_backbone_epochs
    warmup = epoch < t.warmup_epochs
    run.model.train()
    bar = None
    if run.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=state["step_in_epoch"], unit="step",
                   desc=f"epoch {epoch + 1}/{t.epochs}{' (warm-up)' if warmup and t.loss == 'hinge' else ''}")
    meter = _LossMeter(run.run_dir / "log.jsonl", world.main, epoch, lr, objective_name(t.loss, warmup))
    for step in range(state["step_in_epoch"], steps):
        loss = training_step(run, model, step_caps[step], live, warmup=warmup,
                             scale=min(1.0, (step + 1) / steps) if ramp else None)
        if loss is None:
            continue
        state["global_step"] += 1
        state["step_in_epoch"] = step + 1
        loss, pairs = loss
        # Per anchor pair: the hinge loss is a sum over the global batch's rows, InfoNCE already a mean.
        meter.add(float(loss), float(loss) / pairs if t.loss == "hinge" else float(loss))
        if bar:
            bar.update(1)
            bar.set_postfix_str(f"loss/pair {meter.mean_pair:.4g} ({meter.objective})")
        if state["global_step"] % t.log_every == 0:
            meter.flush(state["global_step"])
        # Every rank takes part (each hands rank 0 its RNG streams); only rank 0 writes.
        if t.save_every and state["global_step"] % t.save_every == 0 and step + 1 < steps:
            _save_last(run, dict(state, epoch=epoch))
    if bar:
        bar.close()
    meter.flush(state["global_step"])
    run.epoch_loss = meter.epoch_summary()


def training_step(run: TrainingRun, model: nn.Module, caps: np.ndarray, live, warmup: bool,
                  scale: float | None):
    """One optimiser step on the captions ``caps`` and their images. Returns the loss and the global
    batch's number of pairs, or None when the step is skipped: a live batch without a readable image
    on any rank is skipped by every rank.

    Args:
        run: the run.
        model: ``run.model``, or its DistributedDataParallel wrapper.
        caps: this rank's caption indices.
        live: the live image batches of the epoch (see :func:`live_images`), or None.
        warmup: hinge loss over all negatives instead of the hardest.
        scale: multiplies the loss (the ramp of the CNN's first epoch), or None.
    """
    t, device, (image_side_, text_side_) = run.cfg.train, run.device, run.sides[:2]
    imgs = run.split.caption_to_image[caps]
    images, image_lengths, keep = image_inputs(image_side_, imgs, device, live)
    if _any_rank_skips(images is None, run.world, not image_side_.cached, device):
        return None
    text_rng, aug_gen = run.rngs
    texts, text_lengths = caption_inputs(run.model, text_side_, caps[keep], device, augment=True, rng=text_rng,
                                         generator=aug_gen)
    with autocast(t.precision, device):
        img_emb, txt_emb, logit_scale = model(images, image_lengths, texts, text_lengths)
    # Each rank computes the loss of the whole global batch; DDP averages the ranks' gradients.
    img_all, txt_all, ids_all, _ = gather_batch(img_emb.float(), txt_emb.float(),
                                                torch.as_tensor(imgs[keep], device=device))
    loss = run.loss_fn(img_all, txt_all, ids_all, warmup=warmup, logit_scale=logit_scale)
    if scale is not None:
        loss = loss * scale
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"]], t.grad_clip)
    run.optimizer.step()
    return loss.detach(), len(img_all)


class _LossMeter:
    """The mean training loss, per step and per anchor pair, (and seconds per step) since the last
    line of ``log.jsonl``, and over the epoch; only rank 0 writes. ``objective`` says which loss it
    is (the hinge loss changes meaning after the warm-up)."""

    def __init__(self, path: Path, writes: bool, epoch: int, lr: float, objective: str):
        self.path, self.writes, self.epoch, self.lr, self.objective = path, writes, epoch, lr, objective
        self.total, self.total_pair, self.n, self.t0 = 0.0, 0.0, 0, time.time()
        self.epoch_pair, self.epoch_n = 0.0, 0

    @property
    def mean_pair(self) -> float:
        return self.total_pair / max(self.n, 1)

    def add(self, loss: float, per_pair: float) -> None:
        self.total += loss
        self.total_pair += per_pair
        self.n += 1
        self.epoch_pair += per_pair
        self.epoch_n += 1

    def flush(self, global_step: int) -> None:
        if self.writes and self.n:
            _log(self.path, {"step": global_step, "epoch": self.epoch + 1, "loss": self.total / self.n,
                             "loss_per_pair": self.mean_pair, "objective": self.objective, "lr": self.lr,
                             "sec_per_step": (time.time() - self.t0) / self.n})
        self.total, self.total_pair, self.n, self.t0 = 0.0, 0.0, 0, time.time()

    def epoch_summary(self) -> str:
        """The epoch's mean loss per pair, for the console line after validation."""
        if not self.epoch_n:
            return ""
        return f"loss/pair {self.epoch_pair / self.epoch_n:.4g} ({self.objective}, lr {self.lr:.3g}); "


def _end_epoch(run: TrainingRun, epoch: int) -> None:
    """Validate on rank 0 (every ``eval_every`` epochs and after the last), keep the best
    checkpoint, write ``last/``."""
    t, state = run.cfg.train, run.state
    state["epoch"], state["step_in_epoch"] = epoch + 1, 0
    if run.world.main and ((epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs):
        metrics = evaluate_split(run.model, run.sides[2], run.sides[3], run.device, run.cfg.data.num_workers)
        metrics["epoch"] = epoch + 1
        _log(run.run_dir / "log.jsonl", {"epoch": epoch + 1, "val": metrics})
        print(f"epoch {epoch + 1}: {run.epoch_loss}val rsum {metrics['rsum']:.1f} "
              f"(i2t R@1 {metrics['i2t_r1']:.1f}, t2i R@1 {metrics['t2i_r1']:.1f})", flush=True)
        if metrics["rsum"] > state["best_rsum"]:
            state["best_rsum"], state["best_epoch"] = metrics["rsum"], epoch + 1
            save_model(run.model, run.run_dir / "best", run.cfg, metrics)
        plot_history(run.run_dir)
    _save_last(run, state)
    if run.world.size > 1:
        dist.barrier()


def _any_rank_skips(skip: bool, world: World, can_skip: bool, device) -> bool:
    """Whether this step is skipped (no readable image in the batch). Under DDP every rank must skip
    together, or the ranks' collectives fall out of step; only live image batches can be empty."""
    if world.size == 1 or not can_skip:
        return skip
    flag = torch.tensor([1.0 if skip else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def _save_last(run: TrainingRun, state: dict):
    """Everything a resumed run needs to continue exactly: weights, optimizer, counters, RNG states.

    Called on every rank: the ranks draw different augmentations, so each one's RNG streams are
    gathered to rank 0, which alone writes ``last/`` (rank r > 0's as ``rng.torch.r``,
    ``rng.augment.r`` and ``text_rng_ranks[r]``; rank 0's under the single-process names).
    """
    world = run.world
    text_rng, aug_gen = run.rngs
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
    tensors, opt_state = optimizer_to_flat(run.optimizer)
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
    save_model(run.model, run.run_dir / "last", run.cfg, None, (tensors, extra))


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


def _restore(run: TrainingRun) -> dict:
    """Load ``last/`` into the run (weights, optimizer, this rank's RNG streams); returns its counters."""
    last, world = run.run_dir / "last", run.world
    state_dict, _, _ = load_checkpoint(last)
    tensors, saved = load_trainer_state(last)
    # Runs saved before the model owned InfoNCE's temperature kept it with the trainer state.
    state_dict = upgrade_state_dict({**state_dict, **{k: v for k, v in tensors.items() if k.startswith("loss.")}})
    missing, unexpected = run.model.load_state_dict(state_dict, strict=False)
    if unexpected:
        raise ValueError(f"{last}: unexpected tensors {unexpected[:5]}")
    # Left on the CPU: load_state_dict moves the moments to their parameters' device and keeps
    # AdamW's step counters on the host, where the optimizer wants them (a GPU counter would cost a
    # synchronisation per parameter and step).
    optimizer_from_flat(run.optimizer, {k: v for k, v in tensors.items() if k.startswith("optim.")},
                        saved["optimizer"])
    text_rng, aug_gen = run.rngs
    suffix = f".{world.rank}" if world.rank else ""
    text_state = saved["text_rng"] if not world.rank else saved.get("text_rng_ranks", {}).get(str(world.rank))
    if f"rng.torch{suffix}" in tensors and text_state is not None:
        torch.set_rng_state(tensors[f"rng.torch{suffix}"])
        aug_gen.set_state(tensors[f"rng.augment{suffix}"])
        text_rng.setstate(_tupled(text_state))
        if run.device.type == "cuda" and f"rng.cuda{suffix}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda{suffix}"])
    else:
        # Saved by a run with fewer processes: this rank keeps its freshly seeded streams (taking
        # rank 0's would make two ranks draw the same augmentations); the rest resumes exactly.
        print(f"rank {world.rank}: {last} holds no RNG state for this rank "
              f"(saved with {saved.get('world_size', 1)} process(es)); augmentations restart from the seed",
              flush=True)
    return saved["state"]
