"""Resuming and reproducing a run: the run directory, the resumable ``last/`` checkpoint (weights,
optimizer, counters and every rank's RNG streams), and the fixed CPU threads and deterministic
kernels under which a resumed run continues bit for bit on the same machine.
"""

from __future__ import annotations

import json
import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.deterministic as deterministic
from torch import nn

from ..config import RunConfig, config_from_dict
from ..data.splits import resolve_data_path
from ..distributed import World
from ..model import save_model
from ..model.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_trainer_state,
    optimizer_from_flat,
    optimizer_to_flat,
    upgrade_state_dict,
)
from ..model.vse import load_stored_weights

if TYPE_CHECKING:  # a type only: the loop imports this module
    from .loop import TrainingRun


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a run to resume (``last/``, or the copy a save in progress keeps)."""
    run_dir = Path(run_dir)
    return (run_dir / "last").exists() or (run_dir / ".last.old").exists()


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
    if cfg.train.init_from and not resume:  # stored absolute: the run resumes from any folder
        cfg.train.init_from = str(Path(cfg.train.init_from).resolve())
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return cfg, bool(resume)


# Model fields that decide the weights' layout: a checkpoint starts a run only where they agree.
ARCHITECTURE_FIELDS = ("image_encoder", "backbone", "feature_dim", "text_encoder", "text_model", "word_dim",
                       "embed_dim", "grid_mlp", "image_pooling", "text_pooling")


def read_init_checkpoint(path: str | Path) -> tuple[dict, dict, dict | None]:
    """``(tensors, config, metrics)`` of the saved model ``train.init_from`` names, read once: the
    BiGRU vocabulary comes from its config (the word embeddings are indexed by it), the weights from
    its tensors (:func:`init_weights`)."""
    try:
        return load_checkpoint(path)
    except CheckpointError as exc:
        raise ValueError(f"train.init_from: {exc}") from None


def init_weights(model: nn.Module, path: str | Path, checkpoint: tuple[dict, dict, dict | None]) -> None:
    """Start ``model`` from a saved model's weights (``train.init_from``, read by
    :func:`read_init_checkpoint`); the optimizer, schedule and counters start fresh. The usual use:
    fine-tune the CNN or the text transformer of a model first trained on cached features (the
    paper's frozen first epoch, made cheap).

    Raises ValueError naming the field when the checkpoint's architecture differs from the run's."""
    state, config, _ = checkpoint
    saved = config.get("model", {})
    for name in ARCHITECTURE_FIELDS:
        if name in saved and saved[name] != getattr(model.config, name):
            raise ValueError(f"train.init_from ({path}): that model has model.{name}={saved[name]!r}, this "
                             f"run {getattr(model.config, name)!r}; the weights only fit the same architecture")
    skipped = tuple(config.get("stored_prefixes_skipped", []))
    try:
        load_stored_weights(model, upgrade_state_dict(state), skipped, Path(path), saved)
    except CheckpointError as exc:
        raise ValueError(f"train.init_from: {exc}") from None


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators, as the run starts (model initialisation)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def augmentation_rngs(seed: int, rank: int) -> tuple[random.Random, torch.Generator]:
    """This rank's caption augmentation streams: one for the tokens (masked, replaced, deleted),
    one for cached token outputs (dropped). Ranks draw differently; ``last/`` keeps every rank's."""
    return random.Random(seed * 1000 + rank), torch.Generator().manual_seed(seed + 7919 * rank)


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


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


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
