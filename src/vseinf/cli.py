"""The ``vseinf`` command line: argument parsing and printing only.

Errors a user can cause (bad files, bad config keys, bad arguments) print one line on stderr and
exit with status 2; set VSEINF_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _add_train(sub):
    p = sub.add_parser("train", help="train a VSE∞ model",
                       description="Train VSE∞. Any config key can be overridden: --lr 2e-4, "
                                   "--model.image_pooling max, --epochs 10 …")
    p.add_argument("--config", help="YAML or JSON config file (defaults reproduce the paper)")
    p.add_argument("--data", help="dataset folder or file (overrides data.path)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, log, plot)")
    p.add_argument("--resume", nargs="?", const="yes", default="no", choices=["yes", "auto", "no"],
                   help="continue the run in --out where it stopped; '--resume auto' continues it if it "
                        "has a checkpoint and starts it otherwise (for jobs that are restarted, e.g. "
                        "torchrun --max_restarts or a preemptible queue)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _cmd_train(args, extra):
    from .config import load_config, parse_overrides
    from .train import train

    overrides = parse_overrides(extra)
    if args.data:
        overrides.insert(0, ("data.path", args.data))
    cfg = load_config(args.config, overrides)
    resume = {"yes": True, "no": False, "auto": "auto"}[args.resume]
    metrics = train(cfg, args.out, resume=resume, progress=not args.no_progress)
    if metrics:
        from .evaluation import format_table

        print(f"best checkpoint: {Path(args.out) / 'best'} (epoch {metrics.get('epoch')})")
        print(format_table(metrics))
    return 0


def _add_eval(sub):
    p = sub.add_parser("eval", help="evaluate checkpoints (Recall@K, medr, meanr, RSUM)")
    p.add_argument("--checkpoint", action="append", required=True,
                   help="checkpoint or run directory; repeat to evaluate an ensemble (averaged similarities)")
    p.add_argument("--weight", type=float, action="append",
                   help="an ensemble's weight of each --checkpoint's similarities, in the same order "
                        "(default: equal weights, the average)")
    p.add_argument("--data", help="dataset folder or file (default: the checkpoint's data.path)")
    p.add_argument("--split", default=None, help="split to evaluate (default: the run's val split)")
    p.add_argument("--protocol", default="all", help="all | coco1k | coco5k | folds=N")
    p.add_argument("--json", help="write the metrics here")
    p.add_argument("--max-images", type=int, default=0, help="evaluate only the first N images (quick check)")
    p.add_argument("--device", default="cpu")
    return p


def _cmd_eval(args, extra):
    from .evaluation import format_table
    from .evaluate import evaluate_checkpoints

    if extra:
        raise ValueError(f"eval: unknown arguments {' '.join(extra)}")
    metrics = evaluate_checkpoints(args.checkpoint, data=args.data, split=args.split, protocol=args.protocol,
                                   device=args.device, max_images=args.max_images, weights=args.weight)
    print(format_table(metrics))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _add_extract(sub):
    p = sub.add_parser("extract", help="run frozen backbones once over a dataset and cache their features")
    p.add_argument("--config", help="config file (model and data sections are used)")
    p.add_argument("--data", help="dataset folder or file (overrides data.path)")
    p.add_argument("--split", action="append", help="splits to extract (default: train and val splits)")
    p.add_argument("--rebuild", action="store_true", help="recompute even if a valid cache exists")
    from .video import add_extract_video_arguments

    add_extract_video_arguments(p)
    return p


def _cmd_extract(args, extra):
    if args.videos:
        from .video import run_extract_video

        return run_extract_video(args, extra)
    from .config import load_config, parse_overrides
    from .data.splits import open_split
    from .features import image_sets, text_sets
    from .model import build_model
    from .train import uses_image_cache, uses_text_cache

    overrides = parse_overrides(extra)
    if args.data:
        overrides.insert(0, ("data.path", args.data))
    cfg = load_config(args.config, overrides)
    if not cfg.data.path:
        raise ValueError("extract: pass --data DIR or set data.path in the config")
    model = build_model(cfg.model).to(args.device).eval()
    for name in args.split or [cfg.data.train_split, cfg.data.val_split]:
        split = open_split(cfg.data.path, name)
        if cfg.model.image_encoder == "grid" and uses_image_cache(cfg):
            src = image_sets(model, split, num_workers=cfg.data.num_workers, rebuild=args.rebuild)
            print(f"{split.name}: image features {src.cache.directory} "
                  f"({len(src)} images, {int(src.broken.sum())} unreadable)")
        if uses_text_cache(cfg):
            src = text_sets(model, split, rebuild=args.rebuild)
            print(f"{split.name}: text features {src.cache.directory} ({len(src)} captions)")
    return 0


def _add_synth(sub):
    p = sub.add_parser("synth", help="the paper's synthetic check of the coefficient generators (supp. Table 6)")
    try:
        from .synth import add_arguments
    except ImportError:  # pragma: no cover
        return p
    add_arguments(p)
    return p


def _cmd_synth(args, extra):
    from .synth import run

    if extra:
        raise ValueError(f"synth: unknown arguments {' '.join(extra)}")
    return run(args)


def _add_convert(sub):
    from .convert import add_convert_parser

    return add_convert_parser(sub)


def _cmd_convert(args, extra):
    from .convert import run_convert

    return run_convert(args, extra)


def _lazy(module: str, add: str, run: str):
    """Parser builder and runner that import their module only when that command is used."""
    import importlib

    def add_fn(sub):
        return getattr(importlib.import_module(module, __package__), add)(sub)

    def run_fn(args, extra):
        return getattr(importlib.import_module(module, __package__), run)(args, extra)

    return add_fn, run_fn


COMMANDS = {
    "train": (_add_train, _cmd_train),
    "eval": (_add_eval, _cmd_eval),
    "extract": (_add_extract, _cmd_extract),
    "encode": _lazy(".index", "add_encode_parser", "run_encode"),
    "search": _lazy(".index", "add_search_parser", "run_search"),
    "serve": _lazy(".serve.app", "add_serve_parser", "run_serve"),
    "demo": _lazy(".demo", "add_demo_parser", "run_demo"),
    "convert": (_add_convert, _cmd_convert),
    "synth": (_add_synth, _cmd_synth),
    "study": _lazy(".study", "add_study_parser", "run_study"),
    "plot-pooling": _lazy(".plots", "add_plot_pooling_parser", "run_plot_pooling"),
}

# Commands whose unknown --key value arguments are config overrides.
TAKES_OVERRIDES = {"train", "extract", "study"}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``only``, just that command's (so a command imports only its module)."""
    parser = argparse.ArgumentParser(prog="vseinf", description="VSE∞ image–text retrieval with GPO")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add, _) in COMMANDS.items():
        if only is None or name == only:
            add(sub)
    return parser


def check_device(name: str) -> str:
    """``--device`` as given, once it names a device this machine has; else a one-line error."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: expected cpu, cuda, cuda:N or mps, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available (torch {torch.__version__}"
                             f"{', a CPU-only build' if torch.version.cuda is None else ''})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine")
    return name


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    if extra and args.command not in TAKES_OVERRIDES:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _, run = COMMANDS[args.command]
    try:
        if getattr(args, "device", None):
            check_device(args.device)
        return int(run(args, extra) or 0)
    except (ValueError, FileNotFoundError, KeyboardInterrupt) as exc:
        if os.environ.get("VSEINF_DEBUG"):
            raise
        if isinstance(exc, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            return 130
        print(f"vseinf {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
