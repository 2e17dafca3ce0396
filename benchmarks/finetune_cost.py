"""What fine-tuning costs on this machine: training pairs/s of the paper's fine-tuning recipes.

Each row is a short ``vseinf train`` run on Flickr8k (batch 128, a few steps per epoch, 2 epochs so
that the CNN is trained in the second, as the recipe does) whose second-epoch seconds per step are
read from ``log.jsonl``. The baseline is the default frozen-feature recipe (heads and GPOs only, on
the feature cache), measured in the same run. From pairs/s follow the wall time of one epoch (30,000
pairs, every caption once; 6,000 pairs, one caption per image) and of the paper's 25-epoch schedule.

    python benchmarks/finetune_cost.py --steps 4 --json results/bench/finetune_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import emit  # benchmarks/_report.py

ROWS: dict[str, list[str]] = {
    "frozen (cached features)": [],
    "text fine-tuned": ["--train.finetune_text", "true"],
    "MobileNetV2 fine-tuned": ["--train.finetune_backbone", "true"],
    "both fine-tuned": ["--train.finetune_text", "true", "--train.finetune_backbone", "true"],
    "EfficientNet-Lite0 fine-tuned": ["--model.backbone", "efficientnet_lite0", "--train.finetune_backbone", "true"],
}


def last_epoch_seconds(run_dir: Path, steps: int) -> list[float]:
    """Per-step seconds of the last epoch (``log_every 1`` writes one record a step), its first step dropped."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    times = [r["sec_per_step"] for r in rows if "sec_per_step" in r][-steps:]
    return times[1:] if len(times) > 1 else times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/flickr8k.yaml")
    p.add_argument("--steps", type=int, default=4, help="steps per epoch to time (the first is dropped)")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    batch = 128
    results = {}
    for name in [r for r in args.rows.split(",") if r]:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "vseinf", "train", "--config", args.config, "--out", tmp,
                   "--train.epochs", "2", "--train.lr_decay_epoch", "2", "--train.max_steps_per_epoch", str(args.steps),
                   "--train.log_every", "1", "--train.save_every", "0", "--data.max_val_images", "50",
                   "--train.batch_size", str(batch), *ROWS[name]]
            print("==", name, flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            # The second epoch is the one that trains the CNN (frozen for the first, as in the recipe).
            steps = last_epoch_seconds(Path(tmp), args.steps)
        sec = statistics.median(steps)
        results[name] = {"sec_per_step": round(sec, 2), "pairs_per_s": round(batch / sec, 1),
                         "epoch_30k_pairs_min": round(30000 / (batch / sec) / 60, 1),
                         "epoch_6k_pairs_min": round(6000 / (batch / sec) / 60, 1),
                         "paper_25_epochs_h": round(25 * 30000 / (batch / sec) / 3600, 1)}
        print(name, results[name], flush=True)
    base = results.get("frozen (cached features)")
    if base:
        for r in results.values():
            r["slowdown_vs_frozen"] = round(r["sec_per_step"] / base["sec_per_step"], 1)
    emit({"batch_size": batch, "rows": results}, args.json)


if __name__ == "__main__":
    main()
