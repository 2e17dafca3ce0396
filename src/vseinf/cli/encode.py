"""``vseinf encode``: build or update a search index over a gallery (see :mod:`vseinf.search`)."""

from __future__ import annotations

import os
from pathlib import Path

from ..search.build import encode_gallery
from ..search.engines import ENGINES, FAISS_THRESHOLD
from ..search.sources import detect_gallery_kind
from .argtypes import nonnegative_int, positive_int


def add_encode_parser(sub):
    p = sub.add_parser("encode", help="embed a folder of images or videos (or a captions file) into a search index",
                       description="Embed a gallery into INDEX_DIR. Re-running on a grown folder encodes only "
                                   "new or changed files; removed files drop out; unreadable files are "
                                   "listed and skipped. A folder of video files gets one embedding and one "
                                   "thumbnail per clip; a folder of <id>.npy frame features (or an .h5 file) "
                                   "needs a video model.")
    p.add_argument("gallery", help="folder of images or video files (searched recursively), frame features "
                                   "(folder of <id>.npy or an .h5 file), or a captions file")
    p.add_argument("--out", required=True, help="index directory to create or update")
    p.add_argument("--model", help="checkpoint directory or bundled model name (default: the bundled model)")
    p.add_argument("--engine", default="auto", choices=["auto", *ENGINES],
                   help=f"search engine (auto: HNSW from {FAISS_THRESHOLD:,} items; IVF-PQ, compressed codes "
                        "re-ranked exactly, once the rows take 8 GiB)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per model call (default 32)")
    p.add_argument("--workers", type=nonnegative_int, default=None,
                   help="processes decoding images ahead of the model (default: up to 4 on a GPU, none on a CPU)")
    p.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, cuda:1…)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and scripts)")
    g = p.add_argument_group("videos")
    g.add_argument("--kind", default="auto", choices=["auto", "images", "videos", "features"],
                   help="what the gallery folder holds (auto: images if any, else videos, else frame features)")
    g.add_argument("--frames", type=positive_int, default=None,
                   help="frames sampled per clip (default: 32 for video models, or the extraction settings'; "
                        "8 for image models, whose clip embedding is the mean of its frames')")
    g.add_argument("--extract-settings",
                   help="video models: the extract.json of the features the model was trained on "
                        "(default: the model's backbone at 224 px, as `vseinf extract` makes them)")
    g.add_argument("--backbone-weights", help="video models: the backbone weights file those settings name")
    return p


def load_model_or_explain(path: str | os.PathLike | None = None, device: str = "cpu"):
    """``vseinf.load_model`` with a message that says what to do when the bundled model is missing."""
    from ..model import load_model
    from ..model.checkpoint import CheckpointError  # lazy: see vseinf.search

    try:
        return load_model(path, device=device)
    except CheckpointError as exc:
        if path is None:
            raise ValueError(f"the bundled model is not installed ({exc}); pass --model CHECKPOINT_DIR "
                             "(a directory made by `vseinf train`)") from None
        raise


def run_encode(args, extra) -> int:
    frames = getattr(args, "frames", None)
    if frames is not None and frames < 1:
        raise ValueError(f"encode: --frames must be a positive integer, got {frames}")
    from ..distributed import init_distributed, leave_distributed  # lazy: see vseinf.search

    world = init_distributed()  # under torchrun: each process encodes a share of an image folder
    try:
        return _encode(args, world)
    finally:
        leave_distributed()


def _encode(args, world) -> int:
    from ..video import VideoEmbedder  # lazy: see vseinf.search

    frames = getattr(args, "frames", None)
    device = args.device
    if world.size > 1 and str(device).startswith("cuda"):
        device = f"cuda:{world.local_rank}"
    model = load_model_or_explain(args.model, device)
    kind = getattr(args, "kind", "auto")
    video = None
    video_options = frames is not None or getattr(args, "extract_settings", None) or \
        getattr(args, "backbone_weights", None)
    if video_options or kind == "videos":
        if kind == "auto":
            kind = detect_gallery_kind(args.gallery, exclude=[args.out]) if Path(args.gallery).exists() else kind
        if kind == "videos":
            video = VideoEmbedder.for_model(model, frames, getattr(args, "extract_settings", None),
                                            getattr(args, "backbone_weights", None))
        elif video_options:
            raise ValueError(f"encode: --frames/--extract-settings/--backbone-weights are for folders of video "
                             f"files; {args.gallery} is taken for {kind}")
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"encode: --workers must be 0 or more, got {args.workers}")
    report = encode_gallery(args.gallery, args.out, model, engine=args.engine, batch_size=args.batch_size,
                            workers=args.workers, progress=not args.no_progress, kind=kind, video=video,
                            world=world if world.size > 1 else None)
    if report is not None:  # rank 0 (or the only process)
        print(report.summary())
    return 0
