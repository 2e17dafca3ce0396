"""The training log (``log.jsonl``: loss records and validation records) and its plot, ``training.png``."""

from __future__ import annotations

import json
from pathlib import Path


def _log(path: Path, record: dict):
    """Append one record to the log (a JSON object a line)."""
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
