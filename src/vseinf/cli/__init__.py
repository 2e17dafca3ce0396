"""The ``vseinf`` command line: argument parsing and printing only.

Each command's parser and runner live in a module of this package (``vseinf encode`` in
:mod:`vseinf.cli.encode`, ``plot-pooling`` in :mod:`vseinf.cli.plot_pooling`, …), registered in
:data:`COMMANDS` and imported only when that command is parsed or run.

Errors a user can cause (bad files, bad config keys, bad arguments) print one line on stderr and
exit with status 2; set VSEINF_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _lazy(module: str, add: str, run: str):
    """Parser builder and runner that import their module only when that command is used."""

    def add_fn(sub):
        return getattr(importlib.import_module(module, __package__), add)(sub)

    def run_fn(args, extra):
        return getattr(importlib.import_module(module, __package__), run)(args, extra)

    return add_fn, run_fn


COMMANDS = {
    "train": _lazy(".train", "add_train_parser", "run_train"),
    "eval": _lazy(".eval", "add_eval_parser", "run_eval"),
    "extract": _lazy(".extract", "add_extract_parser", "run_extract"),
    "encode": _lazy(".encode", "add_encode_parser", "run_encode"),
    "search": _lazy(".search", "add_search_parser", "run_search"),
    "serve": _lazy(".serve", "add_serve_parser", "run_serve"),
    "demo": _lazy(".demo", "add_demo_parser", "run_demo"),
    "convert": _lazy(".convert", "add_convert_parser", "run_convert"),
    "synth": _lazy(".synth", "add_synth_parser", "run_synth_command"),
    "study": _lazy(".study", "add_study_parser", "run_study"),
    "plot-pooling": _lazy(".plot_pooling", "add_plot_pooling_parser", "run_plot_pooling"),
}

# What `vseinf --help` lists: building every command's full parser would import each command's
# module (torch among them) just to print this list. tests/test_cli.py holds these to the parsers.
SUMMARIES = {
    "train": "train a VSE∞ model",
    "eval": "evaluate checkpoints (Recall@K, medr, meanr, RSUM)",
    "extract": "run frozen backbones once over a dataset and cache their features",
    "encode": "embed a folder of images or videos (or a captions file) into a search index",
    "search": "search an index by text, image or video",
    "serve": "web page + JSON API to search an index",
    "demo": "index sample photos with the bundled model and search them (offline)",
    "convert": "import a checkpoint released by the VSE∞ authors",
    "synth": "the paper's synthetic check of the coefficient generators (supp. Table 6)",
    "study": "the paper's studies: train one recipe per configuration",
    "plot-pooling": "plot a model's learned pooling coefficients (paper Fig. 5)",
}

# Commands whose unknown --key value arguments are config overrides.
TAKES_OVERRIDES = {"train", "extract", "study"}


def build_parser(only: str | None = None, full: bool = False) -> argparse.ArgumentParser:
    """The argument parser: with ``only``, that command's full parser (so a command imports only its
    module); else every command listed by its summary, or with ``full`` every full parser."""
    parser = argparse.ArgumentParser(prog="vseinf", description="VSE∞ image–text retrieval with GPO")
    parser.add_argument("--version", action="version", version=f"vseinf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add, _) in COMMANDS.items():
        if name == only or (only is None and full):
            add(sub)
        elif only is None:
            sub.add_parser(name, help=SUMMARIES[name])
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
