"""Retrieval evaluation at scale: exact ranks of N images × 5N captions from embeddings, in bounded memory.

    OMP_NUM_THREADS=1 python benchmarks/eval_scale.py --images 2000 --out results/bench/eval_scale_small.json
    python benchmarks/eval_scale.py                    # the target: 100,000 × 500,000 × 1024 (long)

Generates seeded, l2-normalised float32 embeddings chunk by chunk: random images, and captions that
are noisy copies of their image with a per-caption noise level (log-uniform over ``--noise``), so some
captions are easy and some hopeless and the recalls are neither 0 nor 100 at any scale. Then runs
``vseinf.eval.metrics.rank_details_from_embeddings`` (score blocks of ``--chunk-size``², the full
similarity matrix is never built) with a progress bar, and records wall time, peak resident memory
and the metric table.

Exactness is checked against brute force: for ``--check-queries`` random image queries and as many
caption queries, every score of the query is recomputed in float64 and the query's rank is read
off a stable argsort, exactly as ``rank_details_reference`` does. A fast rank must equal the
float64 rank, or differ only because of a near-tie: another item within ``tol`` of the positive
score, where ``tol`` is four times the largest float32 rounding error measured on those queries'
scores (the fast path scores in float32, like any evaluation of float32 embeddings). When the full
matrix is small (``--full-reference-max-pairs``), ``rank_details_reference`` itself also runs on the
whole float64 matrix. The script exits with status 1 if any rank is off by more than a near-tie.

Writes one JSON object (stdout, and ``--out``), including the throughput in pairs per second and
the wall time it extrapolates to 100,000 × 500,000 pairs.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch
from _procstatus import status_mb  # benchmarks/ is on sys.path when run as a script
from _report import emit  # benchmarks/ is on sys.path when run as a script

from vseinf.eval.metrics import DEFAULT_EMB_CHUNK, rank_details_from_embeddings, rank_details_reference

TARGET_PAIRS = 100_000 * 500_000  # the scale
GEN_CHUNK = 16384  # rows generated at a time (64 MB of float32 at d = 1024)




def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0), so a later VmHWM is one phase's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_embeddings(n_images: int, per_image: int, dim: int, noise: tuple[float, float], seed: int,
                    progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded image embeddings, captions = noisy copies of their image, and the caption → image map.

    Caption j belongs to image ``j // per_image``. Its noise vector has expected norm ``s_j``
    (log-uniform in ``noise``) against the unit image vector, so its cosine with its image is
    about ``1 / sqrt(1 + s_j²)``: near 1 for small ``s_j``, near chance for large ones.
    """
    from tqdm.auto import tqdm

    n_texts = n_images * per_image
    img = np.empty((n_images, dim), dtype=np.float32)
    txt = np.empty((n_texts, dim), dtype=np.float32)
    t2i = np.repeat(np.arange(n_images, dtype=np.int64), per_image)
    bar = tqdm(total=n_images + n_texts, desc="generating embeddings", unit="row", unit_scale=True,
               disable=not progress)
    for c, start in enumerate(range(0, n_images, GEN_CHUNK)):
        stop = min(start + GEN_CHUNK, n_images)
        rng = np.random.default_rng([seed, 0, c])  # one stream per chunk: same data whatever GEN_CHUNK order
        img[start:stop] = _normalise(rng.standard_normal((stop - start, dim), dtype=np.float32))
        bar.update(stop - start)
    lo, hi = np.log(noise[0]), np.log(noise[1])
    for c, start in enumerate(range(0, n_texts, GEN_CHUNK)):
        stop = min(start + GEN_CHUNK, n_texts)
        rng = np.random.default_rng([seed, 1, c])
        scale = np.exp(rng.uniform(lo, hi, size=(stop - start, 1))).astype(np.float32) / np.float32(np.sqrt(dim))
        chunk = rng.standard_normal((stop - start, dim), dtype=np.float32)
        chunk *= scale
        chunk += img[t2i[start:stop]]
        txt[start:stop] = _normalise(chunk)
        bar.update(stop - start)
    bar.close()
    return img, txt, t2i


def _argsort_rank(scores: np.ndarray, correct: np.ndarray) -> int:
    """0-based position of the best-placed correct item in a stable descending argsort."""
    order = np.argsort(-scores, kind="stable")
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    return int(position[correct].min())


def _band(scores: np.ndarray, correct: np.ndarray, tol: float) -> tuple[int, int]:
    """Ranks a float evaluation may give: negatives surely above the positive, and possibly above."""
    threshold = scores[correct].max()
    negatives = np.delete(scores, correct)
    return int((negatives > threshold + tol).sum()), int((negatives >= threshold - tol).sum())


def check_queries(img: np.ndarray, txt: np.ndarray, t2i: np.ndarray, details, n_queries: int, seed: int,
                  progress: bool = True) -> dict:
    """Brute-force float64 ranks of random image and caption queries against the fast ranks."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng([seed, 2])
    n_images, n_texts = len(img), len(txt)
    image_q = np.sort(rng.choice(n_images, min(n_queries, n_images), replace=False))
    text_q = np.sort(rng.choice(n_texts, min(n_queries, n_texts), replace=False))
    first = np.searchsorted(t2i, np.arange(n_images))  # captions of image i: first[i] … (t2i is sorted)
    last = np.searchsorted(t2i, np.arange(n_images), side="right")

    # Every score of the checked queries, in float64 (near-exact) and float32 (the fast path's
    # precision); their largest gap sets the near-tie tolerance.
    cols64 = np.empty((n_images, len(text_q)))
    err = 0.0
    tq64 = txt[text_q].astype(np.float64)
    for start in range(0, n_images, GEN_CHUNK):
        block = img[start:start + GEN_CHUNK]
        cols64[start:start + len(block)] = block.astype(np.float64) @ tq64.T
        err = max(err, float(np.abs(block @ txt[text_q].T - cols64[start:start + len(block)]).max()))
    rows64 = []
    iq64 = img[image_q].astype(np.float64)
    for group in range(0, len(image_q), 64):  # 64 rows × n_texts float64 at a time
        sel = image_q[group:group + 64]
        row = np.empty((len(sel), n_texts))
        for start in range(0, n_texts, GEN_CHUNK):
            block = txt[start:start + GEN_CHUNK]
            row[:, start:start + len(block)] = iq64[group:group + 64] @ block.astype(np.float64).T
            err = max(err, float(np.abs(img[sel] @ block.T - row[:, start:start + len(block)]).max()))
        rows64.append(row)
    rows64 = np.concatenate(rows64) if rows64 else np.empty((0, n_texts))
    tol = max(4 * err, 1e-7)

    out = {"tolerance": tol, "max_float32_error": err}
    bar = tqdm(total=len(image_q) + len(text_q), desc="brute-force check", unit="query", disable=not progress)
    for name, queries, scores_of, correct_of, fast_ranks, fast_top1 in (
        ("i2t", image_q, lambda k: rows64[k], lambda q: np.arange(first[q], last[q]),
         details.i2t_ranks, details.i2t_top1),
        ("t2i", text_q, lambda k: cols64[:, k], lambda q: np.array([t2i[q]]),
         details.t2i_ranks, details.t2i_top1),
    ):
        exact = in_band = near_ties = top1_ok = 0
        bad = []
        for k, q in enumerate(queries):
            scores, correct = scores_of(k), correct_of(q)
            ref = _argsort_rank(scores, correct)
            lo, hi = _band(scores, correct, tol)
            fast = int(fast_ranks[q])
            exact += fast == ref
            near_ties += hi > lo
            if lo <= fast <= hi:
                in_band += 1
            else:
                bad.append({"query": int(q), "fast_rank": fast, "reference_rank": ref, "band": [lo, hi]})
            top1_ok += bool(scores[int(fast_top1[q])] >= scores.max() - tol)
            bar.update(1)
        out[name] = {"queries": len(queries), "exact": exact, "within_near_tie": in_band,
                     "queries_with_near_ties": near_ties, "top1_is_a_best_item": top1_ok,
                     "wrong": bad[:10], "n_wrong": len(bad)}
    bar.close()
    out["ok"] = all(out[d]["n_wrong"] == 0 and out[d]["top1_is_a_best_item"] == out[d]["queries"]
                    for d in ("i2t", "t2i"))
    return out


def full_reference(img: np.ndarray, txt: np.ndarray, t2i: np.ndarray, details, tol: float) -> dict:
    """``rank_details_reference`` on the whole float64 matrix (small runs only).

    Ranks and top-1 indices that differ from the reference must be explained by a near-tie
    (within ``tol``), as in :func:`check_queries`.
    """
    sims = img.astype(np.float64) @ txt.astype(np.float64).T
    ref = rank_details_reference(sims, t2i)
    first = np.searchsorted(t2i, np.arange(len(img)))
    last = np.searchsorted(t2i, np.arange(len(img)), side="right")
    out: dict = {"metrics_equal": details.metrics() == ref.metrics()}
    wrong = 0
    for name, scores_of, correct_of in (
        ("i2t", lambda q: sims[q], lambda q: np.arange(first[q], last[q])),
        ("t2i", lambda q: sims[:, q], lambda q: np.array([t2i[q]])),
    ):
        fast_r, ref_r = getattr(details, name + "_ranks"), getattr(ref, name + "_ranks")
        fast_t, ref_t = getattr(details, name + "_top1"), getattr(ref, name + "_top1")
        differ = np.flatnonzero((fast_r != ref_r) | (fast_t != ref_t))
        for q in differ:
            scores, correct = scores_of(q), correct_of(q)
            lo, hi = _band(scores, correct, tol)
            wrong += not (lo <= fast_r[q] <= hi and scores[fast_t[q]] >= scores.max() - tol)
        out[name] = {"queries": int(len(fast_r)), "ranks_equal": int((fast_r == ref_r).sum()),
                     "top1_equal": int((fast_t == ref_t).sum()), "differ": int(len(differ))}
    out["n_wrong"] = int(wrong)  # differences a near-tie does not explain
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000, help="number of images (default 100,000)")
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=1024, help="embedding dimension (default 1024)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_EMB_CHUNK, help="side of a score block")
    parser.add_argument("--noise", type=float, nargs=2, default=(2.0, 40.0), metavar=("LO", "HI"),
                        help="range of the per-caption noise level (log-uniform)")
    parser.add_argument("--check-queries", type=int, default=200,
                        help="random queries per direction checked by brute force")
    parser.add_argument("--full-reference-max-pairs", type=float, default=2.5e7,
                        help="also run rank_details_reference on the full matrix up to this many pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="where to rank (default cpu; e.g. cuda: the score "
                        "blocks are computed there, the embeddings stay in host memory)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.images < 1 or args.captions_per_image < 1 or args.dim < 1:
        parser.error("--images, --captions-per-image and --dim must be positive")
    if not 0 < args.noise[0] <= args.noise[1]:
        parser.error("--noise LO HI needs 0 < LO <= HI")
    progress = not args.no_progress
    n_texts = args.images * args.captions_per_image
    pairs = args.images * n_texts

    t0 = time.time()
    img, txt, t2i = make_embeddings(args.images, args.captions_per_image, args.dim, tuple(args.noise),
                                    args.seed, progress)
    generate_s = time.time() - t0

    rss_before = status_mb("VmRSS")
    peak_reset = _reset_peak_rss()
    t0 = time.time()
    details = rank_details_from_embeddings(img, txt, t2i, chunk_size=args.chunk_size, progress=progress,
                                           device=args.device)
    rank_s = time.time() - t0
    rank_peak = status_mb("VmHWM") if peak_reset else float("nan")
    metrics = details.metrics()

    t0 = time.time()
    check = check_queries(img, txt, t2i, details, args.check_queries, args.seed, progress)
    if pairs <= args.full_reference_max_pairs:
        check["full_reference"] = full_reference(img, txt, t2i, details, check["tolerance"])
        check["ok"] = check["ok"] and check["full_reference"]["n_wrong"] == 0
    check_s = time.time() - t0

    result = {
        "benchmark": "exact retrieval ranks from embeddings, chunked (rank_details_from_embeddings)",
        "images": args.images, "captions": n_texts, "dim": args.dim, "pairs": pairs,
        "chunk_size": args.chunk_size, "device": args.device or "cpu", "noise": list(args.noise), "seed": args.seed,
        "embeddings_mb": round((img.nbytes + txt.nbytes) / 2**20, 1),
        "generate_s": round(generate_s, 2), "rank_s": round(rank_s, 2), "check_s": round(check_s, 2),
        "pairs_per_s": round(pairs / rank_s), "rss_before_rank_mb": round(rss_before, 1),
        "rank_peak_rss_mb": round(rank_peak, 1), "rank_extra_rss_mb": round(rank_peak - rss_before, 1),
        "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "extrapolated_rank_s_at_100k_x_500k": round(rank_s * TARGET_PAIRS / pairs),
        "metrics": metrics, "check": check,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "processor": _cpu_name(),
    }
    emit(result, args.out)
    if not check["ok"]:
        raise SystemExit("eval_scale: fast ranks disagree with the brute-force reference beyond near-ties")
    return result


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
