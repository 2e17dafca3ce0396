"""``vseinf eval``: Recall@K, medr, meanr and RSUM of checkpoints (the evaluation: :mod:`vseinf.eval`)."""

from __future__ import annotations

import json
from pathlib import Path

from .argtypes import nonnegative_int


def add_eval_parser(sub):
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


def run_eval(args, extra) -> int:
    # imported here, not at the top, so `vseinf eval --help` does not load torch
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
