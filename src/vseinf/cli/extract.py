"""``vseinf extract``: cache the frozen backbones' features of a dataset (:mod:`vseinf.features`), or
with ``--videos DIR --out DIR`` the frame features of video files (:mod:`vseinf.video.extract`)."""

from __future__ import annotations

import signal
import threading

from ..config import load_config, parse_overrides
from ..data.splits import open_split
from ..features import image_sets, text_sets
from ..model import build_model
from ..train import uses_image_cache, uses_text_cache
from ..video.decode import FrameSampler
from ..video.extract import FrameExtractor, extract_video_features
from .argtypes import positive_float, positive_int


def add_extract_parser(sub):
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
    add_extract_video_arguments(p)
    return p


def add_extract_video_arguments(parser) -> None:
    """Adds the video-file options to the ``vseinf extract`` parser."""
    g = parser.add_argument_group("video files (vseinf extract --videos DIR --out DIR)")
    g.add_argument("--videos", help="a folder of video files: decode, sample frames, store T×D "
                                    "features as <out>/<video_id>.npy")
    g.add_argument("--out", help="output folder for the .npy frame features")
    g.add_argument("--frames", type=positive_int, default=None,
                   help="uniform frame count per clip (default 32)")
    g.add_argument("--fps", type=positive_float, default=None, help="sample at this rate instead of a count")
    g.add_argument("--max-frames", type=positive_int, default=None, help="with --fps: at most this many frames")
    g.add_argument("--backbone", default=None,
                   help="image backbone (default: the config's model.backbone, else mobilenet_v2)")
    g.add_argument("--backbone-weights", default=None, help="'default', a weights file, or 'none'")
    g.add_argument("--image-size", type=positive_int, default=None, help="frame input size (default 224)")
    g.add_argument("--frame-batch", type=positive_int, default=32, help="frames per backbone call")
    if not any("--device" in a.option_strings for a in parser._actions):
        parser.add_argument("--device", default="cpu", help="where the backbones run (cpu, cuda, cuda:1…)")
    if not any("--rebuild" in a.option_strings for a in parser._actions):
        parser.add_argument("--rebuild", action="store_true", help="recompute existing features")
    if not any("--no-progress" in a.option_strings for a in parser._actions):
        parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and scripts)")


def _interrupt_on_sigterm() -> None:
    """Stop on SIGTERM (``kill``, a scheduler's timeout) as on Ctrl-C: the same clean-up runs."""

    def stop(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def run_extract(args, extra) -> int:
    _interrupt_on_sigterm()
    if args.videos:
        return run_extract_video(args, extra)
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


def run_extract_video(args, extra=()) -> int:
    """``vseinf extract --videos DIR --out DIR``: the video-file branch of the extract command."""
    if extra:
        raise ValueError(f"extract --videos: unknown arguments {' '.join(extra)}")
    if not args.out:
        raise ValueError("extract --videos needs --out DIR (where the .npy features go)")
    if args.frames is not None and args.fps is not None:
        raise ValueError("extract --videos: give --frames or --fps, not both")
    backbone, weights, size = "mobilenet_v2", "default", 224
    if getattr(args, "config", None):
        cfg = load_config(args.config)
        backbone, weights = cfg.model.backbone, cfg.model.backbone_weights
    backbone = args.backbone or backbone
    weights = args.backbone_weights or weights
    weights = None if weights in ("none", "") else weights
    sampler = (FrameSampler(num_frames=None, fps=args.fps, max_frames=args.max_frames)
               if args.fps is not None else FrameSampler(num_frames=args.frames or 32))
    extractor = FrameExtractor(backbone, weights, args.image_size or size, sampler,
                               batch_size=args.frame_batch, device=args.device)
    report = extract_video_features(args.videos, args.out, extractor,
                                    rebuild=getattr(args, "rebuild", False),
                                    progress=not getattr(args, "no_progress", False))
    print(f"{args.out}: {report.summary()}")
    return 0 if report.written or report.existing else 1
