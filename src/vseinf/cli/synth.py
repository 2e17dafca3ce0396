"""``vseinf synth``: the paper's synthetic check of the coefficient generators (the check:
:mod:`vseinf.studies.synth`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..studies.synth import GENERATORS, PATTERNS, format_table, run_synth
from .argtypes import nonnegative_int, positive_int


def add_synth_parser(sub):
    p = sub.add_parser("synth", help="the paper's synthetic check of the coefficient generators (supp. Table 6)",
                       description="Train four coefficient generators (GPO's sin/cos + BiGRU and three "
                                   "alternatives) to reproduce five fixed pooling patterns (average, max, top-10, "
                                   "top half, linear decay) from pooled outputs of random sets of 20–100 "
                                   "elements, then print the RMSE between learned and true coefficients on seen "
                                   "and unseen set sizes (supplementary Table 6). About 5 minutes on 2 cores; "
                                   "--quick in under one.")
    add_synth_arguments(p)
    return p


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``vseinf synth``."""
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: GPO and the interpolated baseline on patterns A and M-1, small budget")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of initialisation and data (default 0)")
    parser.add_argument("--steps", type=positive_int, default=None, help="training steps per run (overrides the budget)")
    parser.add_argument("--patterns", nargs="+", choices=PATTERNS, default=None, metavar="PATTERN",
                        help=f"patterns to run (default: all; {', '.join(PATTERNS)})".replace("%", "%%"))
    parser.add_argument("--generators", nargs="+", choices=GENERATORS, default=None, metavar="GENERATOR",
                        help=f"coefficient generators to run (default: all; {', '.join(GENERATORS)})")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON to this file")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def run_synth_command(args: argparse.Namespace, extra=()) -> int:
    """Run the synthetic check, print the table, optionally save the JSON; returns an exit code."""
    if extra:
        raise ValueError(f"synth: unknown arguments {' '.join(extra)}")
    result = run_synth(quick=args.quick, seed=args.seed, steps=args.steps,
                       patterns=getattr(args, "patterns", None), generators=getattr(args, "generators", None),
                       progress=getattr(args, "progress", True))
    print(format_table(result))
    if args.out is not None:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out)
    return 0
