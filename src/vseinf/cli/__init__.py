"""The ``vseinf`` command line: argument parsing and printing only.

Each command's parser and runner are registered in :data:`COMMANDS`; the larger ones live in their
own modules (``vseinf encode`` in :mod:`vseinf.cli.encode`, ``search`` in :mod:`vseinf.cli.search`,
``serve`` in :mod:`vseinf.cli.serve`) and are imported only when that command runs.

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


def config_keys_help(width: int = 100) -> str:
    """Every config key that ``--KEY VALUE`` can override, with its type, default and meaning (from
    the dataclasses' docstrings in :mod:`vseinf.config`), one section after another."""
    import dataclasses
    import re
    import textwrap

    from ..config import SECTIONS

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


def _add_train(sub):
    import textwrap

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


def _cmd_train(args, extra):
    from ..config import load_config, parse_overrides
    from ..train import train

    overrides = parse_overrides(extra)
    if args.data:
        overrides.insert(0, ("data.path", args.data))
    cfg = load_config(args.config, overrides)
    resume = {"yes": True, "no": False, "auto": "auto"}[args.resume]
    metrics = train(cfg, args.out, resume=resume, progress=not args.no_progress)
    if metrics:
        from ..eval import format_table

        print(f"best checkpoint: {Path(args.out) / 'best'} (epoch {metrics.get('epoch')})")
        print(format_table(metrics, "video" if cfg.model.image_encoder == "frames" else "image"))
    return 0


def _add_eval(sub):
    from ..argtypes import nonnegative_int

    p = sub.add_parser("eval", help="evaluate checkpoints (Recall@K, medr, meanr, RSUM)",
                       description="Evaluate a checkpoint (or a run directory: its best/) on a split with the "
                                   "community's protocol: Recall@1/5/10, median and mean rank in both "
                                   "directions, and RSUM. Several --checkpoint are evaluated as an ensemble "
                                   "(their similarity matrices averaged). The data is the run's own data.path "
                                   "unless --data is given; features come from the cache when the backbone is "
                                   "frozen (extracted first when missing).")
    p.add_argument("--checkpoint", action="append", required=True,
                   help="checkpoint or run directory; repeat to evaluate an ensemble (averaged similarities)")
    p.add_argument("--weight", type=float, action="append",
                   help="an ensemble's weight of each --checkpoint's similarities, in the same order "
                        "(default: equal weights, the average)")
    p.add_argument("--data", help="dataset folder or file (default: the checkpoint's data.path)")
    p.add_argument("--split", default=None, help="split to evaluate (default: the run's val split)")
    p.add_argument("--protocol", default="all", help="all | coco1k | coco5k | folds=N")
    p.add_argument("--json", help="write the metrics here")
    p.add_argument("--max-images", type=nonnegative_int, default=0, help="evaluate only the first N images (quick check)")
    p.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, cuda:1…)")
    return p


def _gallery_items(checkpoint: str) -> str:
    """"video" for a checkpoint of a video model (frame features), else "image"."""
    try:
        config = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError):
        return "image"
    model = config.get("model", config) if isinstance(config, dict) else {}
    return "video" if isinstance(model, dict) and model.get("image_encoder") == "frames" else "image"


def _cmd_eval(args, extra):
    from ..eval import evaluate_checkpoints, format_table

    if extra:
        raise ValueError(f"eval: unknown arguments {' '.join(extra)}")
    metrics = evaluate_checkpoints(args.checkpoint, data=args.data, split=args.split, protocol=args.protocol,
                                   device=args.device, max_images=args.max_images, weights=args.weight)
    print(format_table(metrics, _gallery_items(metrics["checkpoints"][0])))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _add_extract(sub):
    p = sub.add_parser("extract", help="run frozen backbones once over a dataset and cache their features",
                       description="Run the frozen backbones once over a dataset's splits (the CNN's grid "
                                   "features, the text transformer's token features) and cache their outputs, "
                                   "fp16 and memory-mapped, under $VSEINF_CACHE (default ~/.cache/vseinf). "
                                   "Optional: `vseinf train` and `vseinf eval` extract what they need on their "
                                   "own when it is not cached; running it first does the slow part separately. "
                                   "A stopped extraction (Ctrl-C, a crash) continues from its last record "
                                   "(every 1,024 items) when run again; --rebuild starts over. With --videos DIR "
                                   "--out DIR: frame features of video files, one <id>.npy per clip (clips "
                                   "already there are kept, so a stopped run resumes).")
    p.add_argument("--config", help="config file (model and data sections are used)")
    p.add_argument("--data", help="dataset folder or file (overrides data.path)")
    p.add_argument("--split", action="append", help="splits to extract (default: train and val splits)")
    p.add_argument("--rebuild", action="store_true", help="recompute even if a valid cache exists")
    from ..video.extract import add_extract_video_arguments

    add_extract_video_arguments(p)
    return p


def _interrupt_on_sigterm() -> None:
    """Stop on SIGTERM (``kill``, a scheduler's timeout) as on Ctrl-C: the same clean-up runs."""
    import signal
    import threading

    def stop(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def _cmd_extract(args, extra):
    _interrupt_on_sigterm()
    if args.videos:
        from ..video.extract import run_extract_video

        return run_extract_video(args, extra)
    from ..config import load_config, parse_overrides
    from ..data.splits import open_split
    from ..features import image_sets, text_sets
    from ..model import build_model
    from ..train import uses_image_cache, uses_text_cache

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
    "encode": _lazy(".encode", "add_encode_parser", "run_encode"),
    "search": _lazy(".search", "add_search_parser", "run_search"),
    "serve": _lazy(".serve", "add_serve_parser", "run_serve"),
    "demo": _lazy(".demo", "add_demo_parser", "run_demo"),
    "convert": _lazy(".convert", "add_convert_parser", "run_convert"),
    "synth": _lazy(".synth", "add_synth_parser", "run_synth_command"),
    "study": _lazy(".study", "add_study_parser", "run_study"),
    "plot-pooling": _lazy(".plot_pooling", "add_plot_pooling_parser", "run_plot_pooling"),
}

# Commands whose unknown --key value arguments are config overrides.
TAKES_OVERRIDES = {"train", "extract", "study"}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``only``, just that command's (so a command imports only its module)."""
    from .. import __version__

    parser = argparse.ArgumentParser(prog="vseinf", description="VSE∞ image–text retrieval with GPO")
    parser.add_argument("--version", action="version", version=f"vseinf {__version__}")
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


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of ``parser`` and of the subcommands under it."""
    found = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _option_strings(sub)
    return found


def normalize_flags(argv: list[str], known: set[str]) -> list[str]:
    """Accept ``--batch_size`` for ``--batch-size`` (and the other way round) everywhere.

    Flags are documented with hyphens. A flag the parser does not know under the spelling given
    but knows under the other one is rewritten; anything else (config overrides such as
    ``--model.image-pooling``, which take both spellings too) is left as it is.
    """
    out = []
    for i, token in enumerate(argv):
        if token == "--":
            return out + argv[i:]
        if token.startswith("--") and len(token) > 2:
            name, eq, value = token.partition("=")
            if name not in known:
                for other in (name[:2] + name[2:].replace("_", "-"), name[:2] + name[2:].replace("-", "_")):
                    if other in known:
                        token = other + eq + value
                        break
        out.append(token)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    argv = normalize_flags(argv, _option_strings(parser))
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
