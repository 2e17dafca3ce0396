"""Every plot of the studies: what a trained model's pooling learned, and the pooling study's results.

    vseinf plot-pooling runs/f8k --out docs/coefficients.png

The paper's Figure 5: for each modality, the coefficients θ_k of the sorted positions k = 1..N
are drawn for several set sizes N. A GPO trained on region features puts almost all weight on
k = 1 (max pooling); on grid features the weight spreads over the top positions (like K-max pooling
with a larger K).

``vseinf study pooling`` (:mod:`vseinf.studies.pooling_study`) ends with :func:`plot_study`: a heat map of
validation RSUM over the K-max grid (Figure 6) and a bar chart of the aggregators (Figure 4).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.splits import open_split
from ..pooling import pooling_coefficients


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


def _pyplot():
    """matplotlib's pyplot, drawing to files only (matplotlib is an optional extra: imported on use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_coefficients(panels: list[tuple[str, torch.Tensor, list[int]]], out: str | Path,
                      title: str | None = None) -> Path:
    """One panel per (name, θ, sizes): θ_k over positions k = 1..N, one line per size N."""
    plt = _pyplot()
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
        shown = f"{name.split('+')[0].strip()} branch of {name}" if "+" in name else name
        panels.append((f"{side} ({shown})", theta, sizes))
    title = None
    metrics = getattr(model, "metrics", None) or {}
    if "rsum" in metrics:
        title = f"{getattr(model, 'checkpoint_path', '')}: RSUM {metrics['rsum']:.1f}"
    return plot_coefficients(panels, out, title)


# ---------------------------------------------------------------------------------------------
# The pooling study's pictures (vseinf study pooling)


def _grid_value(name: str) -> str | None:
    if name == "avg":
        return "N"
    if name.startswith("kmax:"):
        return name[5:]
    return None


def grid_table(result: dict) -> tuple[list[str], dict[tuple[str, str], float]]:
    """(K values in order, {(visual K, text K): rsum}) from the size-augmented K-max cells."""
    order = result.get("grid") or []
    table = {}
    for c in result["cells"]:
        kv, kt = _grid_value(c["visual"]), _grid_value(c["text"])
        if kv is not None and kt is not None and c.get("size_augment", True):
            table[(kv, kt)] = c["rsum"]
    if not order:
        keys = {k for pair in table for k in pair}
        order = sorted(keys, key=lambda k: (k == "N", int(k) if k != "N" else 0))
    return list(order), table


def find_cell(result: dict, visual: str, text: str, size_augment: bool = True) -> dict | None:
    for c in result["cells"]:
        if c["visual"] == visual and c["text"] == text and c.get("size_augment", True) == size_augment:
            return c
    return None


def plot_grid(result: dict, out_png: str | Path) -> Path | None:
    """Heat map of dev RSUM over (visual K, text K), with GPO/GPO's RSUM marked on the colour bar."""
    order, table = grid_table(result)
    if not table:
        return None
    plt = _pyplot()

    values = np.full((len(order), len(order)), np.nan)
    for i, kv in enumerate(order):
        for j, kt in enumerate(order):
            if (kv, kt) in table:
                values[i, j] = table[(kv, kt)]
    gpo = find_cell(result, "gpo", "gpo")
    lo, hi = np.nanmin(values), np.nanmax(values)
    if gpo:
        lo, hi = min(lo, gpo["rsum"]), max(hi, gpo["rsum"])
    fig, ax = plt.subplots(figsize=(1.1 * len(order) + 2.8, 1.0 * len(order) + 1.6))
    im = ax.imshow(values, cmap="viridis", vmin=lo, vmax=hi, origin="upper")
    labels = ["N (avg)" if k == "N" else str(k) for k in order]
    ax.set_xticks(range(len(order)), labels)
    ax.set_yticks(range(len(order)), labels)
    ax.set_xlabel("text: K-max pooling, K")
    ax.set_ylabel("visual: K-max pooling, K")
    best = np.unravel_index(np.nanargmax(values), values.shape)
    for i in range(len(order)):
        for j in range(len(order)):
            if not np.isnan(values[i, j]):
                bright = (values[i, j] - lo) / max(hi - lo, 1e-9) > 0.6
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", fontsize=9,
                        color="black" if bright else "white", fontweight="bold" if (i, j) == best else None)
    ax.add_patch(plt.Rectangle((best[1] - 0.5, best[0] - 0.5), 1, 1, fill=False, ec="red", lw=2))
    bar = fig.colorbar(im, ax=ax, label=f"RSUM ({result.get('split', 'val')})")
    title = f"K-max grid, best {np.nanmax(values):.1f} (red box)"
    if gpo:
        bar.ax.axhline(gpo["rsum"], color="red", lw=2)
        bar.ax.text(1.05, gpo["rsum"], " GPO", color="red", va="center", transform=bar.ax.get_yaxis_transform())
        title += f"\nGPO on both sides: {gpo['rsum']:.1f} (red line)"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)


def aggregator_rows(result: dict, fixed: str = "gpo") -> dict[str, list[dict]]:
    """Cells of the aggregator comparison per modality: {"visual": [...], "text": [...]}.

    A visual row varies the visual pooling with ``fixed`` text pooling, and the other way round;
    grid cells other than these (e.g. kmax on both sides) are left out.
    """
    rows = {"visual": [], "text": []}
    for c in result["cells"]:
        if c["text"] == fixed:
            rows["visual"].append(c)
        if c["visual"] == fixed:
            rows["text"].append(c)
    return rows


def plot_aggregators(result: dict, out_png: str | Path, fixed: str | None = None) -> Path | None:
    """Bar chart of RSUM per aggregator, one panel per modality, with and without size augmentation."""
    fixed = fixed or result.get("fixed", "gpo")
    rows = aggregator_rows(result, fixed)
    if len(rows["visual"]) + len(rows["text"]) <= 1:
        return None
    from matplotlib.patches import Patch

    plt = _pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    all_values = [c["rsum"] for side in rows.values() for c in side]
    lo = min(all_values) - 0.15 * (max(all_values) - min(all_values) + 1)
    for ax, side in zip(axes, ("visual", "text")):
        cells = rows[side]
        names = list(dict.fromkeys(c[side] for c in cells))
        wanted = [n for n in result.get("aggregators") or [] if n in names]
        names = wanted + [n for n in names if n not in wanted]
        augs = sorted({c["size_augment"] for c in cells}, reverse=True)
        width = 0.8 / max(len(augs), 1)
        for a, aug in enumerate(augs):
            vals = []
            for n in names:
                c = next((c for c in cells if c[side] == n and c["size_augment"] == aug), None)
                vals.append(c["rsum"] if c else np.nan)
            xs = np.arange(len(names)) + (a - (len(augs) - 1) / 2) * width
            colors = ["tab:red" if n.startswith("gpo") else ("tab:blue" if aug else "tab:gray") for n in names]
            ax.bar(xs, vals, width, color=colors, alpha=1.0 if aug else 0.55)
            for x, v in zip(xs, vals):
                if not np.isnan(v):
                    ax.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
        ax.set_ylim(lo, max(all_values) + 0.12 * (max(all_values) - lo))
        ax.set_ylabel(f"RSUM ({result.get('split', 'val')})")
        other = "text" if side == "visual" else "visual"
        ax.set_title(f"{side} aggregator ({other}: {fixed})")
    handles = [Patch(color="tab:blue", label="other aggregators"), Patch(color="tab:red", label="GPO and its variants")]
    if any(not c["size_augment"] for side in rows.values() for c in side):
        handles.append(Patch(color="tab:gray", alpha=0.55, label="right bar, paler: without size augmentation"))
    fig.legend(handles=handles, fontsize=8, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)


def plot_study(result: dict, prefix: str | Path) -> list[Path]:
    """Heat map ``<prefix>_grid.png`` and bar chart ``<prefix>_aggregators.png`` (those that apply)."""
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    made = [plot_grid(result, f"{prefix}_grid.png"), plot_aggregators(result, f"{prefix}_aggregators.png")]
    return [p for p in made if p is not None]
