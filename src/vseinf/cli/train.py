"""``vseinf train``: train a model (the training loop: :mod:`vseinf.train`)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import textwrap
from pathlib import Path

from ..config import SECTIONS, load_config, parse_overrides


def config_keys_help(width: int = 100) -> str:
    """Every config key that ``--KEY VALUE`` can override, with its type, default and meaning (from
    the dataclasses' docstrings in :mod:`vseinf.config`), one section after another."""
    lines = ["config keys: override any with --SECTION.KEY VALUE (or --KEY VALUE when only one section has",
             "the key); a config file sets them as YAML/JSON sections. Defaults reproduce the paper."]
    for section, cls in SECTIONS.items():
        meaning = {}
        doc = (cls.__doc__ or "").split("Args:", 1)[-1]
        for names, text in re.findall(r"\n {8}([\w /]+?): (.*?)(?=\n {8}[\w /]+?: |\n\s*$|$)", doc, re.S):
            text = re.sub(r"\s*\(SPEC §[^)]*\)", "", " ".join(text.split()))  # internal references
            for name in names.split("/"):
                meaning[name.strip()] = text
        lines.append(f"  {section}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            head = f"    --{section}.{f.name.replace('_', '-')} ({f.type}, default {default!r})"
            text = meaning.get(f.name, "")
            lines.append(textwrap.fill(f"{head}: {text}" if text else head, width, subsequent_indent=" " * 8))
    return "\n".join(lines)


def add_train_parser(sub):
    description = ("Train VSE∞ on a dataset: validation RSUM every epoch, the best checkpoint in OUT/best, "
                   "a resumable one in OUT/last, log.jsonl and training.png. Any config key (listed below) "
                   "can be overridden on the command line: --lr 2e-4, --model.image-pooling max, --epochs 10 …")
    p = sub.add_parser("train", help="train a VSE∞ model", description=textwrap.fill(description, 100),
                       epilog=config_keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML or JSON config file (defaults reproduce the paper)")
    p.add_argument("--data", help="dataset folder or file (overrides data.path)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, log, plot)")
    p.add_argument("--resume", nargs="?", const="yes", default="no", choices=["yes", "auto", "no"],
                   help="continue the run in --out where it stopped; '--resume auto' continues it if it "
                        "has a checkpoint and starts it otherwise (for jobs that are restarted, e.g. "
                        "torchrun --max_restarts or a preemptible queue)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and scripts)")
    return p


def run_train(args, extra) -> int:
    # imported here, not at the top, so `vseinf train --help` does not load torch
    from ..distributed import leave_distributed
    from ..eval import format_table
    from ..train import train

    overrides = parse_overrides(extra)
    if args.data:
        overrides.insert(0, ("data.path", args.data))
    cfg = load_config(args.config, overrides)
    resume = {"yes": True, "no": False, "auto": "auto"}[args.resume]
    try:
        metrics = train(cfg, args.out, resume=resume, progress=not args.no_progress)
    finally:
        leave_distributed()  # under torchrun; see there
    if metrics:
        print(f"best checkpoint: {Path(args.out) / 'best'} (epoch {metrics.get('epoch')})")
        print(format_table(metrics, "video" if cfg.model.image_encoder == "frames" else "image"))
    return 0
