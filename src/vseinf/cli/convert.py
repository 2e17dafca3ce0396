"""``vseinf convert``: import a checkpoint released by the VSE∞ authors (the conversion:
:mod:`vseinf.model.convert`)."""

from __future__ import annotations

import argparse

from ..model.convert import TRUST_FLAG, convert_checkpoint


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert", help="import a checkpoint released by the VSE∞ authors",
        description="Convert a checkpoint saved by the authors' VSE∞ code (region + BERT, grid + BERT, "
                    "region + BiGRU) into a vseinf checkpoint directory for eval, search and serve. "
                    "Their files are Python pickles, which can run arbitrary code when loaded: convert "
                    f"only files you trust, and say so with {TRUST_FLAG}.")
    p.add_argument("checkpoint", help="the authors' checkpoint file (e.g. model_best.pth)")
    p.add_argument("--out", required=True, help="vseinf checkpoint directory to write")
    p.add_argument("--vocab", help="vocabulary JSON (word2idx) of a BiGRU model")
    p.add_argument(TRUST_FLAG, dest="trust_pickle", action="store_true",
                   help="I trust this file: allow unpickling it (required)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip loading the result back to check it")
    return p


def run_convert(args, extra) -> int:
    if extra:
        raise ValueError(f"convert: unknown arguments {' '.join(extra)}")
    report = convert_checkpoint(args.checkpoint, args.out, trust_pickle=args.trust_pickle, vocab=args.vocab,
                                overwrite=args.overwrite, verify=args.verify)
    print(report.summary())
    return 0
