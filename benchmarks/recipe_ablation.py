"""The recipe's ablation on Flickr8k: one training run per row, each changing one element.

Every row is a ``vseinf train`` command on the default config (``configs/flickr8k.yaml``) with a few
overrides, or the minimal reference trainer (``benchmarks/baseline_trainer.py``). Runs are kept
under ``--runs`` (one folder a row) and skipped when already finished, so the script can be stopped
and started again; the table of dev RSUMs goes to ``--json``.

    python benchmarks/recipe_ablation.py --rows fixed-gpo,fixed-max --json results/recipe_ablation_flickr8k.json
    python benchmarks/recipe_ablation.py --list          # every row and its command
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _report import emit  # benchmarks/_report.py

HERE = Path(__file__).resolve().parent
MAX = ["--model.image_pooling", "max", "--model.text_pooling", "max"]
AVG = ["--model.image_pooling", "avg", "--model.text_pooling", "avg"]
GPO_MAX = ["--model.image_pooling", "gpo+max", "--model.text_pooling", "gpo+max", "--model.embed_dim", "2048"]
# Stage 2 of a fine-tuning row: start from the gpo+max row's model (trained on cached features, the
# paper's frozen first epochs made cheap), then one epoch with the backbone(s) training at 5e-5 (the
# paper's 0.1 x 5e-4) and the heads at the rate they finished at. "{runs}" is this script's --runs.
STAGE2 = GPO_MAX + ["--train.init_from", "{runs}/gpo+max/best", "--train.epochs", "1", "--train.warmup_epochs", "0",
                    "--train.lr", "5e-5", "--train.backbone_lr_mult", "1", "--train.text_backbone_lr_mult", "1",
                    "--train.freeze_backbone_epochs", "0"]
STAGE2_EFFNET = [a.replace("gpo+max/", "gpo+max-effnet/") for a in STAGE2] + ["--model.backbone", "efficientnet_lite0"]

# name → (what changes, arguments). "baseline:" rows run the reference trainer instead of vseinf.
ROWS: dict[str, tuple[str, list[str]]] = {
    "baseline-max": ("reference trainer: Linear + max pooling, fp32, no masking", ["baseline:", "--pool", "max"]),
    "baseline-max-seed1": ("reference trainer, seed 1", ["baseline:", "--pool", "max", "--seed", "1"]),
    "baseline-mask": ("reference trainer + same-image masking (another caption of the anchor's image is "
                      "not a negative; vseinf does this)", ["baseline:", "--pool", "max", "--mask-same-image"]),
    "baseline-no-special": ("reference trainer, captions pooled without [CLS] and [SEP]",
                            ["baseline:", "--pool", "max", "--no-special-tokens"]),
    "baseline-mask-seed1": ("reference trainer + same-image masking, seed 1",
                            ["baseline:", "--pool", "max", "--mask-same-image", "--seed", "1"]),
    "baseline-no-special-seed1": ("reference trainer without [CLS] and [SEP], seed 1",
                                  ["baseline:", "--pool", "max", "--no-special-tokens", "--seed", "1"]),
    "baseline-image-order": ("reference trainer, batches drawn photo by photo (every photo once a round, with one "
                             "of its unused captions) instead of shuffled captions", ["baseline:", "--pool", "max",
                                                                                       "--order", "images"]),
    "baseline-image-order-seed1": ("the same, seed 1", ["baseline:", "--pool", "max", "--order", "images",
                                                        "--seed", "1"]),
    "xavier-max": ("vseinf max/max with the authors' Xavier head init (the old default)",
                   MAX + ["--model.head_init", "xavier"]),
    "fixed-max": ("vseinf max/max, PyTorch's head init (the new default)", MAX),
    "fixed-max-seed1": ("vseinf max/max, seed 1", MAX + ["--train.seed", "1"]),
    "fixed-avg": ("vseinf avg/avg", AVG),
    "fixed-gpo": ("vseinf GPO/GPO (the default recipe)", []),
    "fixed-gpo-seed1": ("vseinf GPO/GPO, seed 1", ["--train.seed", "1"]),
    "xavier-gpo": ("vseinf GPO/GPO with the Xavier head init", ["--model.head_init", "xavier"]),
    "max-no-size-augment": ("max/max without size augmentation", MAX + ["--model.size_augment", "false"]),
    "max-bf16": ("max/max with bf16 autocast (auto picks fp32 on CPUs without native bf16)",
                 MAX + ["--train.precision", "bf16"]),
    "max-no-warmup": ("max/max, hardest negatives from the first step", MAX + ["--train.warmup_epochs", "0"]),
    "max-wd0": ("max/max without weight decay", MAX + ["--train.weight_decay", "0"]),
    # The climb: one change at a time on top of the default GPO recipe.
    "gpo-mlp": ("GPO/GPO + the paper's MLP residual in the grid head", ["--model.grid_mlp", "true"]),
    "gpo-8ep": ("GPO/GPO, 8 epochs (lr ÷ 10 from epoch 7)", ["--train.epochs", "8", "--train.lr_decay_epoch", "6"]),
    "gpo-infonce": ("GPO/GPO, InfoNCE instead of the hinge loss", ["--train.loss", "infonce"]),
    "gpo-infonce-8ep": ("GPO/GPO, InfoNCE, 8 epochs", ["--train.loss", "infonce", "--train.epochs", "8",
                                                       "--train.lr_decay_epoch", "6"]),
    "gpo-lr1e-3": ("GPO/GPO, lr 1e-3", ["--train.lr", "1e-3"]),
    # A GPO branch and a max branch in one model (1024-d each, one loss per branch): the ensemble of a
    # GPO and a max model, trained in one run.
    "gpo+max": ("a GPO and a max-pooling branch side by side on both sides (2 × 1024-d)",
                ["--model.image_pooling", "gpo+max", "--model.text_pooling", "gpo+max", "--model.embed_dim", "2048"]),
    "gpo+max+avg": ("GPO, max and average-pooling branches side by side on both sides (3 × 1024-d)",
                    ["--model.image_pooling", "gpo+max+avg", "--model.text_pooling", "gpo+max+avg",
                     "--model.embed_dim", "3072"]),
    "gpo+max-seed1": ("gpo+max, seed 1", GPO_MAX + ["--train.seed", "1"]),
    "gpo+max-5ep": ("gpo+max, 5 epochs, lr ÷ 10 for the last two", GPO_MAX + ["--train.epochs", "5"]),
    "gpo+max-effnet": ("gpo+max on EfficientNet-Lite0 grids instead of MobileNetV2's",
                       GPO_MAX + ["--model.backbone", "efficientnet_lite0"]),
    # Fine-tuning as the paper does (text at 0.1x lr; the CNN end to end from epoch 2 at 0.1x, BatchNorm
    # frozen, on live 224-px photos with crops and flips). Each sees ~one caption per image an epoch
    # (47 steps of 128) to fit this CPU.
    "ft-text": ("GPO/GPO, MiniLM fine-tuned at 0.1x lr, 47 steps an epoch",
                ["--train.finetune_text", "true", "--train.max_steps_per_epoch", "47"]),
    # 47-step epochs give the all-negatives warm-up only 47 steps, and ft-text collapsed when the hardest
    # negatives started (dev RSUM 161 → 98); this one warms up for 188 steps (the frozen recipe: 234).
    "ft-text-warm": ("GPO/GPO, MiniLM fine-tuned at 0.1x lr, 94 steps an epoch, 2 warm-up epochs",
                     ["--train.finetune_text", "true", "--train.max_steps_per_epoch", "94",
                      "--train.warmup_epochs", "2"]),
    "ft-cnn": ("GPO/GPO, MobileNetV2 fine-tuned from epoch 2, 47 steps an epoch",
               ["--train.finetune_backbone", "true", "--train.max_steps_per_epoch", "47"]),
    "ft-both": ("GPO/GPO, MiniLM and MobileNetV2 fine-tuned, 47 steps an epoch",
                ["--train.finetune_text", "true", "--train.finetune_backbone", "true",
                 "--train.max_steps_per_epoch", "47"]),
    "ft-cnn-effnet": ("GPO/GPO, EfficientNet-Lite0 fine-tuned from epoch 2, 47 steps an epoch",
                      ["--model.backbone", "efficientnet_lite0", "--train.finetune_backbone", "true",
                       "--train.max_steps_per_epoch", "47"]),
    # Two stages: gpo+max on cached features (the row above), then the backbones fine-tuned from it.
    "ft-text-stage2": ("gpo+max, then MiniLM fine-tuned for one epoch (234 steps, every caption once)",
                       STAGE2 + ["--train.finetune_text", "true"]),
    "ft-cnn-stage2": ("gpo+max, then MobileNetV2 fine-tuned on live photos (crops, flips) for 47 steps",
                      STAGE2 + ["--train.finetune_backbone", "true", "--train.max_steps_per_epoch", "47"]),
    "ft-both-stage2": ("gpo+max, then MiniLM and MobileNetV2 fine-tuned for 47 steps",
                       STAGE2 + ["--train.finetune_text", "true", "--train.finetune_backbone", "true",
                                 "--train.max_steps_per_epoch", "47"]),
    "ft-text-effnet-stage2": ("gpo+max-effnet, then MiniLM fine-tuned for one epoch (234 steps)",
                              STAGE2_EFFNET + ["--train.finetune_text", "true"]),
    "ft-both-effnet-stage2": ("gpo+max-effnet, then MiniLM and EfficientNet-Lite0 fine-tuned for 47 steps",
                              STAGE2_EFFNET + ["--train.finetune_text", "true", "--train.finetune_backbone", "true",
                                               "--train.max_steps_per_epoch", "47"]),
    "ft-text-layers-effnet-2ep": ("gpo+max-effnet, then MiniLM's layers fine-tuned (its embeddings left pretrained) "
                                  "for two epochs (468 steps)",
                                  STAGE2_EFFNET + ["--train.finetune_text", "true", "--train.text_train_embeddings",
                                                   "false", "--train.epochs", "2"]),
    "ft-text-layers-effnet-4ep": ("ft-text-layers-effnet-2ep, then two more epochs of the same (lr ÷ 10 in the "
                                  "second; the optimizer starts fresh)",
                                  [a.replace("gpo+max-effnet/", "ft-text-layers-effnet-2ep/") for a in STAGE2_EFFNET]
                                  + ["--train.finetune_text", "true", "--train.text_train_embeddings", "false",
                                     "--train.epochs", "2", "--train.lr_decay_epoch", "1"]),
    "ft-cnn-effnet-stage2": ("gpo+max-effnet, then EfficientNet-Lite0 fine-tuned for 47 steps",
                             STAGE2_EFFNET + ["--train.finetune_backbone", "true", "--train.max_steps_per_epoch", "47"]),
}


def command(name: str, run_dir: Path, config: str) -> list[str]:
    args = [a.replace("{runs}", str(run_dir.parent)) for a in ROWS[name][1]]
    if args and args[0] == "baseline:":
        return [sys.executable, str(HERE / "baseline_trainer.py"), "--config", config,
                "--json", str(run_dir / "metrics.json"), *args[1:]]
    return [sys.executable, "-m", "vseinf", "train", "--config", config, "--out", str(run_dir), "--resume", "auto",
            *args]


def result_of(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data.get("final", data)  # the baseline nests its table under "final"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="baseline-max,fixed-max,fixed-gpo,fixed-avg,xavier-max")
    p.add_argument("--config", default="configs/flickr8k.yaml")
    p.add_argument("--runs", default=os.path.join(os.environ.get("VSEINF_CACHE", "runs"), "ablation"))
    p.add_argument("--json", default="results/recipe_ablation_flickr8k.json")
    p.add_argument("--list", action="store_true", help="print the rows and their commands, run nothing")
    args = p.parse_args()
    names = list(ROWS) if args.rows == "all" else [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"unknown rows: {', '.join(unknown)} (known: {', '.join(ROWS)})")
    table = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {"rows": {}}
    for name in names:
        run_dir = Path(args.runs) / name
        cmd = command(name, run_dir, args.config)
        if args.list:
            print(f"{name}: {ROWS[name][0]}\n  {' '.join(cmd)}")
            continue
        if result_of(run_dir) is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            start = time.time()
            print(f"== {name}: {' '.join(cmd)}", flush=True)
            subprocess.run(cmd, check=True)
            (run_dir / "wall_s.txt").write_text(f"{time.time() - start:.0f}\n")
        metrics = result_of(run_dir)
        wall = (run_dir / "wall_s.txt").read_text().strip() if (run_dir / "wall_s.txt").exists() else None
        # Re-read before writing: two copies of this script may run side by side (one row each).
        table = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {"rows": {}}
        table["rows"][name] = {"what": ROWS[name][0], "args": ROWS[name][1], "rsum": round(metrics["rsum"], 1),
                               "i2t": [round(metrics[f"i2t_r{k}"], 1) for k in (1, 5, 10)],
                               "t2i": [round(metrics[f"t2i_r{k}"], 1) for k in (1, 5, 10)],
                               "wall_s": int(wall) if wall else None}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")
    if not args.list:
        emit(table, None)


if __name__ == "__main__":
    main()
