"""``vseinf plot-pooling``: draw a model's learned pooling coefficients (the plot: :mod:`vseinf.studies.plots`)."""

from __future__ import annotations

from ..eval import resolve_checkpoint
from ..model import load_model
from ..studies.plots import default_video_sizes, plot_model_pooling


def _sizes(text: str | None, flag: str) -> list[int] | None:
    if not text:
        return None
    try:
        sizes = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated positive integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"{flag}: expected comma-separated positive integers, got {text!r}")
    return sizes


def add_plot_pooling_parser(sub):
    """``vseinf plot-pooling CHECKPOINT --out FILE.png`` (registered as "plot-pooling")."""
    p = sub.add_parser("plot-pooling", help="plot a model's learned pooling coefficients (paper Fig. 5)",
                       description="Draw θ over sorted positions for several set sizes, one panel per "
                                   "modality, from a checkpoint or run directory.")
    p.add_argument("checkpoint", help="checkpoint directory or run directory (uses its best/)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--image-sizes", help="set sizes for the image (or video) panel, e.g. 12,24,36,49 (default: "
                                         "the grid size or 36 regions and smaller; a video model: the frame "
                                         "counts of its validation clips)")
    p.add_argument("--text-sizes", help="set sizes for the text panel, e.g. 6,10,15,20,30")
    return p


def run_plot_pooling(args, extra) -> int:
    if extra:
        raise ValueError(f"plot-pooling: unknown arguments {' '.join(extra)}")
    model = load_model(resolve_checkpoint(args.checkpoint))
    image_sizes = _sizes(args.image_sizes, "--image-sizes")
    if image_sizes is None and model.config.image_encoder == "frames":
        image_sizes, where = default_video_sizes(model)
        print(f"video panel: N = {', '.join(map(str, image_sizes))} ({where})")
    out = plot_model_pooling(model, args.out, image_sizes, _sizes(args.text_sizes, "--text-sizes"))
    print(f"wrote {out}")
    return 0
