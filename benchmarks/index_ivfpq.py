"""IVF-PQ, the engine for galleries of millions, against HNSW and exact search on VSE embeddings.

    python benchmarks/index_ivfpq.py [--model CKPT] [--data ../shared/data/flickr8k] [--scale 1000000]
                                     [--out results/bench/index_ivfpq.json] [--device cuda]

Sections (one JSON document on stdout, and in --out):

- ``flickr8k``: the bundled model's (or --model's) 1024-d embeddings of the Flickr8k train captions
  as the gallery, train images as queries (image→text). Exact search is the ground truth; HNSW at
  its defaults; IVF-PQ at the defaults and over a grid of ``nprobe`` (cells scanned) × ``rerank``
  (candidates re-scored exactly). Each engine's memory per gallery row is the size of its
  serialised FAISS index divided by the rows (HNSW holds a float32 copy of every row and its links;
  IVF-PQ holds codes, while re-ranking reads the memory-mapped rows that the exact engine uses).
- ``scale``: the caption embeddings plus jittered copies (x + 0.03·noise, renormalised) up to
  ``--scale`` rows, IVF-PQ at its defaults against exact search: build time, index size, recall@10
  and per-query latency. Jittered copies make each query's neighbours near-duplicates, so recall
  here is a stress figure, not a promise for real galleries; the flickr8k section is the real case.

Latency is per query: one query vector per call, after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
from _report import emit  # benchmarks/ is on sys.path when run as a script
from index_search import K, flickr_embeddings, latency_ms, log, normalise, recall_at_k

from vseinf.search.engines import IVF_NPROBE, IVF_RERANK, ExactIndex, HNSWIndex, IVFPQIndex


def index_bytes(engine) -> int:
    import faiss

    return int(faiss.serialize_index(engine.index).size)


def ivfpq_row(index: IVFPQIndex, queries: np.ndarray, truth: np.ndarray, exact_p50: float, n_latency: int) -> dict:
    _, ids = index.search(queries, K)
    row = {"nprobe": index.nprobe, "rerank": index.rerank, "recall_at_10": recall_at_k(ids, truth),
           **latency_ms(index, queries, n_latency)}
    row["speedup_p50"] = round(exact_p50 / row["p50_ms"], 1)
    row["default"] = (index.nprobe, index.rerank) == (IVF_NPROBE, IVF_RERANK)
    log(f"    nprobe {index.nprobe:3d} rerank {index.rerank:4d}: recall@10 {row['recall_at_10']:.3f}  "
        f"p50 {row['p50_ms']:.3f} ms  ({row['speedup_p50']}× exact)")
    return row


def flickr_section(gallery: np.ndarray, queries: np.ndarray, args) -> dict:
    exact = ExactIndex(gallery, device=args.device)
    _, truth = exact.search(queries, K)
    out = {"gallery": int(len(gallery)), "dim": int(gallery.shape[1]), "queries": int(len(queries)),
           "float32_bytes_per_row": gallery.shape[1] * 4,
           "exact": latency_ms(exact, queries, args.exact_latency_queries)}
    exact_p50 = out["exact"]["p50_ms"]
    t0 = time.perf_counter()
    hnsw = HNSWIndex.build(gallery)
    out["hnsw"] = {"build_s": round(time.perf_counter() - t0, 2), "ef_search": hnsw.ef_search,
                   "bytes_per_row": round(index_bytes(hnsw) / len(gallery), 1),
                   "recall_at_10": recall_at_k(hnsw.search(queries, K)[1], truth),
                   **latency_ms(hnsw, queries, args.latency_queries)}
    out["hnsw"]["speedup_p50"] = round(exact_p50 / out["hnsw"]["p50_ms"], 1)
    log(f"  hnsw: recall@10 {out['hnsw']['recall_at_10']:.3f}, p50 {out['hnsw']['p50_ms']:.3f} ms, "
        f"{out['hnsw']['bytes_per_row']:.0f} B/row")
    t0 = time.perf_counter()
    ivf = IVFPQIndex.build(gallery)
    out["ivfpq"] = {"build_s": round(time.perf_counter() - t0, 2), **ivf.describe(),
                    "bytes_per_row": round(index_bytes(ivf) / len(gallery), 1), "grid": []}
    log(f"  ivfpq: built in {out['ivfpq']['build_s']} s, {out['ivfpq']['bytes_per_row']:.0f} B/row")
    for nprobe in args.nprobe:
        for rerank in args.rerank:
            ivf.nprobe, ivf.rerank = nprobe, rerank
            out["ivfpq"]["grid"].append(ivfpq_row(ivf, queries, truth, exact_p50, args.latency_queries))
    return out


def scale_section(base: np.ndarray, queries: np.ndarray, n: int, args, rng) -> dict:
    extra = base[rng.choice(len(base), max(0, n - len(base)))]
    gallery = np.concatenate([base, normalise(extra + 0.03 * rng.standard_normal(extra.shape, dtype=np.float32))])
    del extra
    log(f"scale: {len(gallery):,} rows × {gallery.shape[1]} ({len(base):,} real + jittered copies)")
    exact = ExactIndex(gallery, device=args.device)
    t0 = time.perf_counter()
    _, truth = exact.search(queries, K)
    out = {"gallery": int(len(gallery)), "dim": int(gallery.shape[1]), "queries": int(len(queries)),
           "source": f"{len(base):,} Flickr8k caption embeddings + jittered copies (x + 0.03·noise, renormalised)",
           "float32_rows_gb": round(gallery.nbytes / 1e9, 2),
           "exact": {"batched_ms_per_query": round((time.perf_counter() - t0) * 1000 / len(queries), 2),
                     **latency_ms(exact, queries, args.exact_latency_queries)}}
    log(f"  exact: p50 {out['exact']['p50_ms']:.1f} ms")
    t0 = time.perf_counter()
    ivf = IVFPQIndex.build(gallery)
    out["ivfpq"] = {"build_s": round(time.perf_counter() - t0, 1), **ivf.describe(),
                    "index_mb": round(index_bytes(ivf) / 1e6, 1), "grid": []}
    log(f"  ivfpq: built in {out['ivfpq']['build_s']} s, index {out['ivfpq']['index_mb']} MB")
    for nprobe in (IVF_NPROBE // 2, IVF_NPROBE):
        ivf.nprobe = nprobe
        out["ivfpq"]["grid"].append(ivfpq_row(ivf, queries, truth, out["exact"]["p50_ms"], args.latency_queries))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint (default: the bundled model)")
    p.add_argument("--data", default=os.environ.get("VSEINF_FLICKR8K", "../shared/data/flickr8k"))
    p.add_argument("--flickr-split", default="train")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--latency-queries", type=int, default=300)
    p.add_argument("--exact-latency-queries", type=int, default=100)
    p.add_argument("--nprobe", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32, 64])
    p.add_argument("--rerank", type=lambda s: [int(x) for x in s.split(",")], default=[50, 100, 200])
    p.add_argument("--scale", type=int, default=1_000_000, help="rows of the scale section (0: skip it)")
    p.add_argument("--device", default="cpu", help="where the exact engine runs (cpu, cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)

    import faiss
    import torch

    rng = np.random.default_rng(args.seed)
    model_path, image_emb, caption_emb = flickr_embeddings(args)
    queries = image_emb[rng.choice(len(image_emb), min(args.queries, len(image_emb)), replace=False)]
    result = {
        "benchmark": "index_ivfpq", "k": K, "model": model_path,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
                    "faiss": faiss.__version__, "exact_device": args.device},
        "latency": "single-query calls (one vector per search), after 5 warm-up queries",
    }
    log(f"flickr8k image→text: {len(caption_emb):,} captions, {len(queries)} image queries")
    result["flickr8k"] = flickr_section(caption_emb, queries, args)
    if args.scale:
        result["scale"] = scale_section(caption_emb, queries[:200], args.scale, args, rng)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
