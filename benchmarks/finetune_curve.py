"""The bundled model's training curve: dev RSUM after each epoch against the training time spent.

    python benchmarks/finetune_curve.py --runs RUNS   # RUNS: recipe_ablation.py's --runs folder

Reads the ``log.jsonl`` of the stages (``gpo+max-effnet``: both backbones frozen, cached features;
``ft-text-layers-effnet-2ep``: MiniLM's layers fine-tuned from it; ``ft-text-layers-effnet-4ep``:
two more epochs of that, when it has run) and writes
``results/finetune_curve_flickr8k.json`` and ``docs/finetune_curve_flickr8k.png``. Time is the
training steps' own (log.jsonl's seconds per step × steps), without validation and feature caching.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STAGES = (("gpo+max-effnet", "stage 1: heads on cached features (backbones frozen)"),
          ("ft-text-layers-effnet-2ep", "stage 2: MiniLM's layers fine-tuned (the bundled model)"),
          ("ft-text-layers-effnet-4ep", "two more epochs of stage 2 (lr ÷ 10 in the second)"))
TARGET = 330.0  # the target for a fine-tuned model


def epoch_curve(log_lines: list[dict]) -> list[dict]:
    """Per epoch: its dev RSUM and the minutes its training steps took."""
    out, seconds, last_step = [], 0.0, 0
    for entry in log_lines:
        if "val" in entry:
            out.append({"epoch": entry["epoch"], "rsum": round(entry["val"]["rsum"], 2),
                        "train_min": round(seconds / 60, 1)})
            seconds = 0.0
        elif "sec_per_step" in entry:
            # after a resume the log goes back to the saved step: steps run again took time again
            seconds += entry["sec_per_step"] * max(entry["step"] - last_step, 0)
            last_step = entry["step"]
    return out


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    hours = 0.0
    for stage, colour in zip(curve["stages"], ("tab:blue", "tab:orange", "tab:green")):
        # a later stage's line starts at the model it started from
        xs, ys = ([hours], [stage["start_rsum"]]) if stage["start_rsum"] is not None else ([], [])
        for e in stage["epochs"]:
            hours += e["train_min"] / 60
            xs.append(hours)
            ys.append(e["rsum"])
        ax.plot(xs, ys, "o-", color=colour, label=stage["what"])
    ax.axhline(TARGET, color="grey", ls="--", lw=1)
    ax.text(0.02, TARGET + 1, f"target for a fine-tuned model ({TARGET:.0f})", color="grey", fontsize=8,
            transform=ax.get_yaxis_transform())
    ax.set_xlabel("training time on this 2-core CPU (hours, validation excluded)")
    ax.set_ylabel("Flickr8k dev RSUM")
    ax.set_title("The bundled model: frozen features, then MiniLM fine-tuned")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True)
    p.add_argument("--json", default="results/finetune_curve_flickr8k.json")
    p.add_argument("--png", default="docs/finetune_curve_flickr8k.png")
    args = p.parse_args()
    stages, start = [], None
    for name, what in STAGES:
        log = Path(args.runs) / name / "log.jsonl"
        if not log.is_file():  # a stage not run (yet): the curve ends before it
            break
        epochs = epoch_curve(read_log(log))
        if not epochs:  # still in its first epoch
            break
        stages.append({"run": name, "what": what, "start_rsum": start, "epochs": epochs})
        start = max(e["rsum"] for e in epochs)  # the next stage starts from this one's best/
    curve = {"stages": stages, "target": TARGET}
    Path(args.json).write_text(json.dumps(curve, indent=2) + "\n")
    plot(curve, Path(args.png))
    print(json.dumps(curve, indent=2))


if __name__ == "__main__":
    main()
