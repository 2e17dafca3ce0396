"""The training loop: AdamW, the paper's schedule, validation RSUM each epoch, best/last checkpoints.

    vseinf train --config configs/flickr8k.yaml --out runs/f8k         # or
    torchrun --nproc_per_node 2 -m vseinf train --config … --out …

A run directory holds ``config.json`` (the full config), ``best/`` (the checkpoint with the highest
validation RSUM), ``last/`` (the latest state, with optimizer moments and counters, written
atomically every ``save_every`` steps and at each epoch's end), ``log.jsonl`` and ``training.png``.
``--resume`` continues a killed run from ``last/``: same batches, same schedule, and on the same
machine the same weights bit for bit (see :mod:`vseinf.train.state`).

Under torchrun the model is wrapped in DistributedDataParallel (gloo on CPUs, nccl on GPUs), which
averages the gradients across ranks during the backward pass. Every rank embeds its share of the
global batch, gathers the others' embeddings with their gradients and computes the loss of the
whole global batch, so hardest negatives are global and two processes train like one process on
the concatenated batch (see :mod:`vseinf.losses`).

Read top to bottom: :func:`train` opens the run (:func:`start_run`), then each epoch runs
:func:`train_one_epoch` (one :func:`training_step` per batch) and :func:`_end_epoch` (validation,
checkpoints).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..config import RunConfig
from ..data.splits import CaptionSplit
from ..distributed import World, in_turns, init_distributed
from ..encoders.text import Vocabulary
from ..eval import evaluate_split
from ..losses import VSELoss, gather_batch
from ..model import VSEModel, build_model, save_model
from ..precision import autocast, resolve_precision
from .history import _log, objective_name, plot_history
from .inputs import (
    Side,
    caption_inputs,
    epoch_order,
    image_inputs,
    image_side,
    live_images,
    load_splits,
    text_side,
)
from .optim import (
    build_optimizer,
    learning_rate,
    set_backbone_trainable,
    set_learning_rate,
)
from .state import (
    _open_run_dir,
    _restore,
    _save_last,
    augmentation_rngs,
    init_weights,
    read_init_checkpoint,
    reproducible,
    seed_everything,
    thread_count,
)

# Fewer all-negatives steps than this before the hardest-negative loss starts gets a warning: on
# Flickr8k the frozen recipe warms up for 234 steps; a text fine-tuning run with 47 collapsed.
SHORT_WARMUP_STEPS = 200


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
    seed_everything(t.seed)
    train_split, val_split = load_splits(cfg)
    vocab = None
    init = read_init_checkpoint(t.init_from) if t.init_from and not resume else None
    if cfg.model.text_encoder == "bigru":
        if resume:
            vocab = json.loads((run_dir / "last" / "config.json").read_text()).get("text.vocab")
        elif init:
            vocab = init[1].get("text.vocab")
        else:
            vocab = Vocabulary.build(train_split.captions).words
    model = build_model(cfg, vocab=vocab).to(device)
    if cfg.model.text_encoder == "bigru" and cfg.model.glove and not resume and not init:
        model.text.init_from_glove(model.vocab)
    if init:  # not on a resume: the run's last/ holds the weights it went on from
        init_weights(model, t.init_from, init)
        metrics = init[2]
        if world.main:
            score = f" (val RSUM {metrics['rsum']:.1f})" if metrics and "rsum" in metrics else ""
            print(f"starting from the weights of {t.init_from}{score}")
    if t.finetune_text and not t.text_train_embeddings:
        model.set_text_embeddings_trainable(False)
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
    rngs = augmentation_rngs(t.seed, world.rank)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_rsum": -1.0, "best_epoch": -1}
    run = TrainingRun(cfg, run_dir, world, device, model, VSELoss(t.loss, t.margin, branches=model.branches).to(device),
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
        warmup_steps = t.warmup_epochs * _steps_per_epoch(t, len(usable_caps), world.size)
        if warmup_steps < SHORT_WARMUP_STEPS and t.epochs > t.warmup_epochs:
            print(f"warning: the warm-up is only {warmup_steps} steps; hardest negatives after so short a "
                  "warm-up can collapse the embeddings (a Flickr8k text fine-tuning run fell from 161 to 98 "
                  "RSUM). Raise --train.warmup-epochs (or --train.max-steps-per-epoch).")
    return run


def train_one_epoch(run: TrainingRun, epoch: int) -> None:
    """The steps of one epoch, from ``run.state["step_in_epoch"]`` on (mid-epoch after a resume);
    the resumable ``last/`` checkpoint is written every ``save_every`` steps."""
    cfg, t, world, state = run.cfg, run.cfg.train, run.world, run.state
    backbone_training = set_backbone_trainable(run.model, cfg, epoch)
    model = run.replicate()
    lr = learning_rate(cfg, epoch)
    set_learning_rate(run.optimizer, lr)
    step_caps = _epoch_batches(run, epoch)
    steps = len(step_caps)
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


def _steps_per_epoch(t, n_captions: int, world_size: int) -> int:
    steps = n_captions // (t.batch_size * world_size)  # whole global batches only (see epoch_order)
    return min(steps, t.max_steps_per_epoch) if t.max_steps_per_epoch else steps


def _epoch_batches(run: TrainingRun, epoch: int) -> list[np.ndarray]:
    """This rank's caption indices of each step of the epoch (at most ``max_steps_per_epoch`` steps)."""
    t = run.cfg.train
    order = epoch_order(len(run.usable_caps), t.seed, epoch, run.world, t.batch_size)
    steps = _steps_per_epoch(t, len(run.usable_caps), run.world.size)
    return [run.usable_caps[order[s * t.batch_size:(s + 1) * t.batch_size]] for s in range(steps)]


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


def _device(world: World) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


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


def _any_rank_skips(skip: bool, world: World, can_skip: bool, device) -> bool:
    """Whether this step is skipped (no readable image in the batch). Under DDP every rank must skip
    together, or the ranks' collectives fall out of step; only live image batches can be empty."""
    if world.size == 1 or not can_skip:
        return skip
    flag = torch.tensor([1.0 if skip else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)
