"""The paper's pooling studies as one command: train the same recipe once per pooling choice.

    vseinf study pooling --config configs/flickr8k.yaml --grid 1,2,5,10,N --out grid.json
    vseinf study pooling --config configs/flickr8k.yaml --aggregators avg,max,gem,fspool,gpo \\
        --no-size-augment-too --epochs 4 --out aggregators.json

A *cell* is one (visual pooling, text pooling, size augmentation) choice. Every cell trains
``vseinf.train.train`` with the study's config (any ``--key value`` override applies to all cells)
and only ``model.image_pooling``, ``model.text_pooling`` and ``model.size_augment`` changed, and
records the best validation RSUM. Cells come from

* ``--grid 1,2,5,10,N``: K-max pooling on both sides over every pair of K (the paper's Figure 6),
  "N" meaning the whole set (average pooling), plus GPO on both sides;
* ``--aggregators a,b,...``: each aggregator on one modality while the other keeps ``--fixed``
  (default GPO) — the paper's Figure 4 / supplementary Table 1; ``cls`` is text-only;
  ``--no-size-augment-too`` repeats these cells without size augmentation (supplementary Table 2).

Each cell has its own run directory under ``--runs-dir`` (named after the cell and a hash of its
config, so a changed recipe never reuses old runs) holding the training config, log and
checkpoints. A cell whose directory has ``metrics.json`` is finished and skipped when the study is
re-run; an interrupted one resumes from its ``last/`` checkpoint. ``--out`` is rewritten after every
cell; at the end a heat map of the grid and a bar chart of the aggregators are drawn
(:mod:`vseinf.studies.plots`; PNG, beside the JSON or at ``--plots PREFIX``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import multiprocessing as mp
import os
import re
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import RunConfig, apply_override, load_config, parse_overrides
from ..pooling import build_pooling
from ..train import has_checkpoint, train
from .plots import plot_study

# Aggregators that only make sense on one side.
TEXT_ONLY = {"cls"}


# ---------------------------------------------------------------------------------------------
# Cells


@dataclass(frozen=True)
class Cell:
    """One training run of the study."""

    visual: str
    text: str
    size_augment: bool = True

    def label(self) -> str:
        aug = "aug" if self.size_augment else "noaug"
        return f"v-{_slug(self.visual)}_t-{_slug(self.text)}_{aug}"

    def config(self, base: RunConfig) -> RunConfig:
        cfg = copy.deepcopy(base)
        cfg.model.image_pooling = self.visual
        cfg.model.text_pooling = self.text
        cfg.model.size_augment = self.size_augment
        if is_parameter_free(self.visual) and is_parameter_free(self.text):
            # No pooling parameters to apply it to: normalise the setting so that a study whose recipe
            # only changes how pooling layers learn reuses these cells instead of retraining them.
            cfg.train.pooling_lr_mult = 1.0
        return cfg


def is_parameter_free(name: str) -> bool:
    """True for poolings without learnable parameters (avg, max, K-max, CLS)."""
    name = name.strip().lower()
    return name in ("avg", "max", "cls") or name.startswith("kmax")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "", name.replace(":", ""))


def parse_grid(text: str) -> list[int | str]:
    """``"1,2,5,10,N"`` → ``[1, 2, 5, 10, "N"]`` (N: the whole set)."""
    values: list[int | str] = []
    for part in text.split(","):
        part = part.strip()
        if part.upper() == "N":
            value: int | str = "N"
        elif part.isdigit() and int(part) >= 1:
            value = int(part)
        else:
            raise ValueError(f"--grid: expected positive integers or N separated by commas, got {part!r} in {text!r}")
        if value in values:
            raise ValueError(f"--grid: {value} is listed twice in {text!r}")
        values.append(value)
    if not values:
        raise ValueError("--grid: no values given")
    return values


def grid_pooling(k: int | str) -> str:
    """The pooling name of a grid value: K-max pooling, or average pooling for the whole set."""
    return "avg" if k == "N" else f"kmax:{k}"


def parse_aggregators(text: str) -> list[str]:
    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    if not names:
        raise ValueError("--aggregators: no names given")
    for name in names:
        try:
            build_pooling(name, 8)
        except ValueError as exc:
            raise ValueError(f"--aggregators: {exc}") from None
    return list(dict.fromkeys(names))


def plan_cells(grid: list[int | str] | None = None, aggregators: list[str] | None = None,
               fixed: str = "gpo", size_augment: bool = True, no_size_augment_too: bool = False) -> list[Cell]:
    """The study's cells, without duplicates, in running order (grid first, then aggregators).

    Args:
        grid: K values for the K-max grid over both modalities (plus GPO on both sides).
        aggregators: aggregator names compared per modality, the other side using ``fixed``.
        fixed: the pooling of the modality not being compared.
        size_augment: size augmentation of the grid and aggregator cells (the config's value).
        no_size_augment_too: also run every aggregator cell without size augmentation.
    """
    cells: list[Cell] = []
    if grid:
        for kv in grid:
            for kt in grid:
                cells.append(Cell(grid_pooling(kv), grid_pooling(kt), size_augment))
        cells.append(Cell("gpo", "gpo", size_augment))
    if aggregators:
        augs = [size_augment] + ([False] if no_size_augment_too and size_augment else [])
        for aug in augs:
            for name in aggregators:
                if name not in TEXT_ONLY:
                    cells.append(Cell(name, fixed, aug))
                cells.append(Cell(fixed, name, aug))
    return list(dict.fromkeys(cells))


def cell_dir(runs_dir: Path, cell: Cell, cfg: RunConfig) -> Path:
    """A cell's run directory: its label plus a hash of its whole config (a changed recipe → new runs)."""
    blob = json.dumps(cfg.to_dict(), sort_keys=True).encode()
    return Path(runs_dir) / f"{cell.label()}-{hashlib.sha256(blob).hexdigest()[:8]}"


# ---------------------------------------------------------------------------------------------
# Running


def run_cell(cell: Cell, base: RunConfig, runs_dir: Path, progress: bool = False) -> dict:
    """Train one cell (or read its finished result) and return its record for the study JSON."""

    cfg = cell.config(base)
    run_dir = cell_dir(runs_dir, cell, cfg)
    done = run_dir / "study_cell.json"
    if (run_dir / "metrics.json").is_file() and done.is_file():
        return json.loads(done.read_text())
    resume = has_checkpoint(run_dir)
    if not resume and (run_dir / "log.jsonl").exists():
        (run_dir / "log.jsonl").unlink()  # a run killed before its first checkpoint starts over
    t0 = time.time()
    if not (run_dir / "metrics.json").is_file():
        train(cfg, run_dir, resume=resume, progress=progress)
    seconds = time.time() - t0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    record = {
        "visual": cell.visual, "text": cell.text, "size_augment": cell.size_augment,
        "rsum": round(float(metrics["rsum"]), 2),
        "rsum_last": round(float(_last_val(run_dir).get("rsum", metrics["rsum"])), 2),
        "best_epoch": metrics.get("epoch"),
        "seconds": round(seconds, 1), "resumed": resume,
        "recalls": {k: round(float(metrics[k]), 2) for k in
                    ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10") if k in metrics},
        "run_dir": str(run_dir),
    }
    done.write_text(json.dumps(record, indent=2) + "\n")
    return record


def _last_val(run_dir: Path) -> dict:
    """The validation metrics of the run's final epoch (``rsum`` is the best epoch's)."""
    last = {}
    log = run_dir / "log.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if "val" in rec:
                last = rec["val"]
    return last


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_parallel(cells: list[Cell], cfg: RunConfig, runs_dir: Path, jobs: int, finished) -> None:
    """Train ``jobs`` cells at a time in worker processes, splitting the CPU threads between them (a
    small model on cached features scales better over processes than over threads)."""
    threads = max(1, torch.get_num_threads() // jobs)
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        pending = {pool.submit(run_cell, cell, cfg, runs_dir): cell for cell in cells}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                finished(pending.pop(future), future.result())


def run_pooling_study(cfg: RunConfig, cells: list[Cell], runs_dir: str | Path, out: str | Path,
                      progress: bool = True, grid: list[int | str] | None = None, meta: dict | None = None,
                      plots: str | Path | None = None, jobs: int = 1) -> dict:
    """Run (or resume) every cell, rewriting ``out`` after each one; then draw the plots (PNG files
    ``<plots>_grid.png`` and ``<plots>_aggregators.png``, default prefix: ``out`` without .json).
    ``jobs`` > 1 trains that many cells at once in worker processes. Returns the JSON."""
    runs_dir, out = Path(runs_dir), Path(out)
    runs_dir.mkdir(parents=True, exist_ok=True)
    result = {"split": cfg.data.val_split, "data": cfg.data.path, "epochs": cfg.train.epochs,
              "lr_decay_epoch": cfg.train.lr_decay_epoch, "grid": [str(k) for k in grid or []],
              **(meta or {}), "cells": []}
    bar = None
    if progress:
        bar = tqdm(total=len(cells), desc="pooling study", unit="cell")

    def finished(cell: Cell, record: dict) -> None:
        records[cell] = record
        # Keep the planned order in the JSON whatever order the cells finish in.
        result["cells"] = [records[c] for c in cells if c in records]
        write_json(out, result)
        if bar:
            bar.write(f"{cell.visual:>16} / {cell.text:<16} aug={cell.size_augment!s:<5} "
                      f"rsum {record['rsum']:.1f}  ({record['seconds']:.0f}s)")
            bar.update(1)

    records: dict[Cell, dict] = {}
    started = time.time()
    try:
        if jobs <= 1:
            for cell in cells:
                if bar:
                    bar.set_postfix_str(f"{cell.visual} / {cell.text}{'' if cell.size_augment else ' (no aug)'}")
                finished(cell, run_cell(cell, cfg, runs_dir))
        else:
            _run_parallel(cells, cfg, runs_dir, jobs, finished)
    finally:
        if bar:
            bar.close()
    result["total_seconds"] = round(sum(c["seconds"] for c in result["cells"]), 1)
    result["wall_seconds"] = round(time.time() - started, 1)
    result["jobs"] = jobs
    write_json(out, result)
    plot_study(result, plots or Path(out).with_suffix(""))
    return result


def write_json(path: Path, data: dict):
    """Write atomically, so an interrupted study never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def study_config(config: str | None, data: str | None, epochs: int | None, extra: list[str]) -> RunConfig:
    """The study's base config: file ← --data ← --epochs (decay epoch scaled) ← ``--key value`` extras."""
    overrides = parse_overrides(extra or [])
    cfg = load_config(config)
    if data:
        apply_override(cfg, "data.path", data)
    if epochs is not None:
        if epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {epochs}")
        # Keep the recipe's shape: decay at the same fraction of training (at least one epoch each side).
        frac = cfg.train.lr_decay_epoch / max(cfg.train.epochs, 1)
        cfg.train.epochs = epochs
        cfg.train.lr_decay_epoch = min(max(round(frac * epochs), 1), epochs - 1) if epochs > 1 else 1
    for key, value in overrides:
        apply_override(cfg, key, value)
    return cfg
