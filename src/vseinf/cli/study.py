"""``vseinf study pooling``: the paper's pooling study (the study itself: :mod:`vseinf.studies.pooling_study`)."""

from __future__ import annotations

from pathlib import Path

from ..studies.pooling_study import parse_aggregators, parse_grid, plan_cells, run_pooling_study, study_config
from .argtypes import positive_int


def add_study_parser(sub):
    """``vseinf study pooling …`` (registered as "study"; it takes config overrides)."""
    p = sub.add_parser("study", help="the paper's studies: train one recipe per configuration",
                       description="Studies that train the same recipe once per configuration.")
    studies = p.add_subparsers(dest="study", metavar="STUDY")
    q = studies.add_parser(
        "pooling", help="K-max grid and aggregator comparison (Figures 4 and 6 of the paper)",
        description="Train the config's recipe once per pooling choice and collect validation RSUM. "
                    "Unknown --key value arguments override the config for every cell "
                    "(e.g. --lr-decay-epoch 3). Re-running skips finished cells.")
    q.add_argument("--config", help="YAML or JSON config file (the recipe every cell trains)")
    q.add_argument("--data", help="dataset folder or file (overrides data.path)")
    q.add_argument("--grid", help="K values for the K-max grid on both sides, e.g. 1,2,5,10,20,N "
                                  "(N: the whole set, i.e. average pooling); GPO/GPO is added")
    q.add_argument("--aggregators", help="aggregators to compare per modality, e.g. "
                                         "avg,max,kmax:5,gem,fspool,cls,attention,gpo,gpo-perdim")
    q.add_argument("--fixed", default="gpo", help="pooling of the other modality in the aggregator "
                                                  "comparison (default: gpo)")
    q.add_argument("--no-size-augment-too", action="store_true",
                   help="also run every aggregator cell without size augmentation")
    q.add_argument("--epochs", type=positive_int, help="epochs per cell; the lr decay epoch scales with it "
                                              "unless --lr-decay-epoch is given")
    q.add_argument("--out", required=True, help="results JSON")
    q.add_argument("--plots", help="path prefix of the PNG plots: PREFIX_grid.png, PREFIX_aggregators.png "
                                   "(default: --out without .json)")
    q.add_argument("--runs-dir", help="where the cells' run directories go (default: <out>_runs/)")
    q.add_argument("--jobs", type=positive_int, default=1, help="cells trained at once, in worker processes that "
                   "share the CPU threads (default 1)")
    q.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and scripts)")
    return p


def run_study(args, extra) -> int:
    if getattr(args, "study", None) != "pooling":
        raise ValueError("study: choose a study, e.g. 'vseinf study pooling --help'")
    if not args.grid and not args.aggregators:
        raise ValueError("study pooling: nothing to run; pass --grid and/or --aggregators")
    cfg = study_config(args.config, args.data, args.epochs, extra)
    if not cfg.data.path:
        raise ValueError("study pooling: pass --data DIR or set data.path in the config")
    grid = parse_grid(args.grid) if args.grid else None
    aggregators = parse_aggregators(args.aggregators) if args.aggregators else None
    parse_aggregators(args.fixed)
    cells = plan_cells(grid, aggregators, args.fixed.strip().lower(), cfg.model.size_augment,
                       args.no_size_augment_too)
    out = Path(args.out)
    runs_dir = Path(args.runs_dir) if args.runs_dir else out.with_name(out.stem + "_runs")
    print(f"pooling study: {len(cells)} cells, {cfg.train.epochs} epochs each "
          f"(lr decay from epoch {cfg.train.lr_decay_epoch + 1}), runs in {runs_dir}")
    meta = {"fixed": args.fixed.strip().lower(), "aggregators": aggregators or [], "config": args.config,
            "overrides": extra or [], "base_config": cfg.to_dict()}
    plots = Path(args.plots) if args.plots else out.with_suffix("")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    result = run_pooling_study(cfg, cells, runs_dir, out, progress=not args.no_progress, grid=grid, meta=meta,
                               plots=plots, jobs=args.jobs)
    print(f"wrote {out} ({len(result['cells'])} cells, {result['total_seconds'] / 60:.1f} min of training)")
    for png in (Path(f"{plots}_grid.png"), Path(f"{plots}_aggregators.png")):
        if png.is_file():
            print(f"wrote {png}")
    return 0
