"""Pictures of what a trained model's pooling learned (the paper's Figure 5).

    vseinf plot-pooling runs/f8k --out docs/coefficients.png

For each modality, the coefficients θ_k of the sorted positions k = 1..N are drawn for several set
sizes N. A GPO trained on region features puts almost all weight on k = 1 (max pooling); on grid
features the weight spreads over the top positions (like K-max pooling with a larger K).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def default_image_size(model) -> int:
    """The image side's usual set size: the CNN's grid (stride 32) or 36 detector regions."""
    cfg = model.config
    if cfg.image_encoder == "grid":
        return max(1, cfg.image_size // 32) ** 2
    return 36


VIDEO_FRAMES = 32  # frames per clip that `vseinf extract --videos` samples by default


def default_video_sizes(model) -> tuple[list[int], str]:
    """Set sizes for a video model's frame panel, and where they come from: the frame counts of
    the run's validation clips (smallest, median, largest; or, when every clip has the same count,
    that count and smaller sizes that frame dropping makes), else ``vseinf extract``'s default."""
    from .data.splits import open_split

    cfg = getattr(model, "run_config", None)
    lengths = np.zeros(0, dtype=np.int64)
    if cfg is not None and cfg.data.path:
        try:
            source = getattr(open_split(cfg.data.path, cfg.data.val_split), "feature_source", None)
            lengths = np.asarray(getattr(source, "lengths", lengths))
        except (OSError, ValueError):
            pass
    lengths = lengths[lengths > 0]
    if not len(lengths):
        return default_sizes(VIDEO_FRAMES), f"{VIDEO_FRAMES} frames, vseinf extract's default"
    counts = sorted({int(np.percentile(lengths, q, method="nearest")) for q in (0, 50, 100)})
    where = f"frame counts of {cfg.data.val_split} clips: {counts[0]}–{counts[-1]}" if len(counts) > 1 else \
        f"{counts[0]} frames a clip in {cfg.data.val_split}"
    return (counts if len(counts) > 1 else default_sizes(counts[0])), where


def default_sizes(n: int, count: int = 4) -> list[int]:
    """``count`` sizes spread over 1..n, ending at n, e.g. 49 → [12, 24, 36, 49]."""
    sizes = sorted({max(1, round(n * (i + 1) / count)) for i in range(count)})
    return sizes


@torch.no_grad()
def pooling_coefficients(pool, sizes: list[int]) -> torch.Tensor:
    """θ (len(sizes) × max(sizes)) of a pooling whose coefficients depend only on the set size.

    GPO-like pools give them directly; one θ per dimension (``gpo-perdim``) or FSPool curves are
    averaged over the dimensions. Fixed pools (avg, max, K-max) are probed with a random set of each
    size. Pools whose weights depend on the values (attention, GeM, cls, ``gpo-features``) have no
    such coefficients: ValueError.
    """
    from .pooling import AvgPool, FSPool, KMaxPool, MaxPool

    if not sizes or min(sizes) < 1:
        raise ValueError(f"set sizes must be positive integers, got {sizes}")
    n_max = max(sizes)
    sizes_t = torch.tensor(sizes, dtype=torch.long)
    if isinstance(pool, FSPool):
        return pool.curves(sizes_t, n_max).mean(2).float().cpu()
    if hasattr(pool, "coefficients") and getattr(pool, "feature_dim", None) is None:
        theta = pool.coefficients(sizes_t, n_max).float().cpu()
        return theta.mean(2) if theta.dim() == 3 else theta
    if isinstance(pool, (AvgPool, MaxPool, KMaxPool)):
        probe = torch.randn(len(sizes), n_max, 1, generator=torch.Generator().manual_seed(0))
        return pool(probe, sizes_t)[1].float().cpu()
    raise ValueError(f"{type(pool).__name__} has no coefficients that depend only on the set size "
                     "(its weights depend on the feature values); nothing to plot")


def plot_coefficients(panels: list[tuple[str, torch.Tensor, list[int]]], out: str | Path,
                      title: str | None = None) -> Path:
    """One panel per (name, θ, sizes): θ_k over positions k = 1..N, one line per size N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (name, theta, sizes) in zip(axes[0], panels):
        cmap = plt.get_cmap("viridis")
        for i, n in enumerate(sizes):
            colour = cmap(i / max(len(sizes) - 1, 1))
            ax.plot(range(1, n + 1), theta[i, :n].numpy(), marker="o", ms=2.5, lw=1.2, color=colour, label=f"N = {n}")
        ax.set_xlabel("sorted position k (1 = largest value)")
        ax.set_ylabel("θ_k")
        ax.set_title(name)
        ax.set_xlim(0.5, max(sizes) + 0.5)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_model_pooling(model, out: str | Path, image_sizes: list[int] | None = None,
                       text_sizes: list[int] | None = None) -> Path:
    """The paper's Figure 5 for a model: θ over positions for several set sizes, per modality.

    Args:
        model: a :class:`vseinf.model.VSEModel`.
        out: PNG path.
        image_sizes: set sizes for the image panel (default: spread up to the grid size / 36 regions;
            a video model's frame counts, see :func:`default_video_sizes`).
        text_sizes: set sizes for the text panel (default: 6, 10, 15, 20, 30 tokens).
    """
    cfg = model.config
    video = cfg.image_encoder == "frames"
    if not image_sizes:
        image_sizes = default_video_sizes(model)[0] if video else default_sizes(default_image_size(model))
    image_sizes = sorted(set(image_sizes))
    text_sizes = sorted(set(text_sizes or [6, 10, 15, 20, 30]))
    panels = []
    for side, pool, sizes, name in (("video" if video else "image", model.image_head.gpool, image_sizes,
                                     cfg.image_pooling),
                                    ("text", model.text.gpool, text_sizes, cfg.text_pooling)):
        try:
            theta = pooling_coefficients(pool, sizes)
        except ValueError as exc:
            raise ValueError(f"{side} pooling {name!r}: {exc}") from None
        panels.append((f"{side} ({name})", theta, sizes))
    title = None
    metrics = getattr(model, "metrics", None) or {}
    if "rsum" in metrics:
        title = f"{getattr(model, 'checkpoint_path', '')}: RSUM {metrics['rsum']:.1f}"
    return plot_coefficients(panels, out, title)


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
    """``vseinf plot-pooling CHECKPOINT --out FILE.png`` (register in cli.COMMANDS as "plot-pooling")."""
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
    from .eval import resolve_checkpoint
    from .model import load_model

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
