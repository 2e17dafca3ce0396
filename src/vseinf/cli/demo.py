"""``vseinf demo``: index sample photos with the bundled model and search them (the session: :mod:`vseinf.demo`)."""

from __future__ import annotations

from pathlib import Path

from ..demo import EXAMPLES, LIMIT_EXAMPLE, run_demo_session
from .argtypes import positive_int
from .encode import load_model_or_explain


def add_demo_parser(sub):
    p = sub.add_parser("demo", help="index sample photos with the bundled model and search them (offline)",
                       description="Index scikit-image's sample photos (or --images DIR) with the bundled model, "
                                   "run a few example queries and show how to open the web page.")
    p.add_argument("--images", help="a folder of your own photos instead of the samples")
    p.add_argument("--model", help="checkpoint directory or bundled model name (default: the bundled model, "
                                  "flickr8k-effnet-minilm-ft; flickr8k-effnet-minilm is the smaller frozen-backbone one)")
    p.add_argument("--out", help="demo working folder (default: $VSEINF_CACHE/demo or ~/.cache/vseinf/demo)")
    p.add_argument("--query", action="append", help="a query to run (repeatable; default: a few examples)")
    p.add_argument("-k", type=positive_int, default=3, help="results per query")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and scripts)")
    return p


def run_demo(args, extra) -> int:
    if args.k < 1:
        raise ValueError(f"demo: -k must be a positive integer, got {args.k}")
    if args.images is not None and not Path(args.images).is_dir():
        raise ValueError(f"{args.images}: not a folder of images")
    model = load_model_or_explain(args.model)
    samples = args.images is None and not args.query  # the curated queries are about the sample photos
    run_demo_session(model, images=args.images, workdir=args.out, queries=args.query or EXAMPLES,
                     k=args.k, progress=not args.no_progress, limit_example=LIMIT_EXAMPLE if samples else None)
    return 0
