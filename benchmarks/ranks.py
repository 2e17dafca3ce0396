"""Time the counting rank evaluation against the community's argsort evaluation and our reference.

The shape is COCO 5K's: 5,000 images × 25,000 captions (5 per image, image i's captions are
5i … 5i+4), float32 scores, as the community evaluates them. Three evaluations run in one process
on the same matrix:

* ``fast``: ``vseinf.eval.metrics.rank_details`` (counts, never sorts);
* ``community``: the evaluation of VSE++, SCAN and VSE∞ (their ``i2t``/``t2i``), re-implemented
  here step for step: for every image, ``numpy.argsort`` of its float32 score row, reversed, then
  the best position among its 5 captions; for every caption, the same on its column of the
  transposed matrix and the position of its image;
* ``reference``: ``vseinf.eval.metrics.rank_details_reference`` (stable argsort per query) on the
  same scores in float64, as the previous version of this benchmark ran it; ``fast`` is timed on
  that float64 matrix too, so each ratio compares one dtype.

Every score of the matrix is a different float32 (a seeded bijection of the entry indices, each
read as a float's bit pattern): with ties the community's unstable argsort would order tied
items arbitrarily. The script checks that all three give identical per-query ranks, top-1 indices
and R@K/medr/meanr, and exits with status 1 otherwise. Prints one JSON object and, with --out,
writes it to a file. The load average is recorded: the machine is shared.

    python benchmarks/ranks.py              # COCO-5K shape, CPU (about a minute on a quiet machine)
    python benchmarks/ranks.py --quick      # 1,000 × 5,000
    python benchmarks/ranks.py --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _report import emit  # benchmarks/ is on sys.path when run as a script

from vseinf.eval.metrics import metrics_from_ranks, rank_details, rank_details_reference

CAPTIONS = 5  # the community's functions assume 5 captions an image, in image order
FIELDS = ("i2t_ranks", "i2t_top1", "t2i_ranks", "t2i_top1")
_BITS = 27  # 2^27 > 125M entries
_MASK = (1 << _BITS) - 1


def distinct_scores(n_images: int, n_texts: int, seed: int, rows_at_once: int = 256) -> np.ndarray:
    """An (n_images, n_texts) float32 matrix whose entries are all different, in random order.

    Entry k is ``h(k)``, a seeded bijection of [0, 2^27) (multiplications by odd numbers and
    xor-shifts, each invertible on 27 bits), read as the bit pattern of a float32 in [2^-7, 2^9):
    distinct integers give distinct floats, ordered like the integers.
    """
    if n_images * n_texts > 1 << _BITS:
        raise ValueError(f"{n_images} × {n_texts} entries: at most 2^{_BITS} distinct scores")
    out = np.empty((n_images, n_texts), dtype=np.float32)
    base = np.uint64(0x3C000000)  # the bit pattern of 2^-7
    offset = np.uint64(seed * 0x2545F491 & _MASK)
    for start in range(0, n_images, rows_at_once):
        stop = min(start + rows_at_once, n_images)
        x = np.arange(start * n_texts, stop * n_texts, dtype=np.uint64)
        x = (x + offset) & np.uint64(_MASK)
        for mult, shift in ((0x2F0B3A49, 13), (0x1C69B3F5, 11), (0x3A8F05C5, 15)):
            x = (x * np.uint64(mult)) & np.uint64(_MASK)
            x ^= x >> np.uint64(shift)
        out[start:stop] = (x + base).astype(np.uint32).view(np.float32).reshape(stop - start, n_texts)
    return out


# ---------------------------------------------------------------------------------------------
# The community's evaluation (VSE++ / SCAN / VSE∞ i2t and t2i), re-implemented as the baseline
# ---------------------------------------------------------------------------------------------


def _recalls(ranks: np.ndarray) -> tuple[float, ...]:
    """R@1, R@5, R@10, medr, meanr the way the community's functions compute them."""
    r1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    r5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    r10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    return r1, r5, r10, float(np.floor(np.median(ranks)) + 1), float(ranks.mean() + 1)


def community_i2t(sims: np.ndarray):
    """Image → text: per image, argsort its row, reverse, best position of its 5 captions."""
    n_images = sims.shape[0]
    ranks = np.zeros(n_images)
    top1 = np.zeros(n_images)
    for image in range(n_images):
        order = np.argsort(sims[image])[::-1]
        best = 1e20
        for caption in range(CAPTIONS * image, CAPTIONS * image + CAPTIONS):
            where = np.where(order == caption)[0][0]
            if where < best:
                best = where
        ranks[image] = best
        top1[image] = order[0]
    return _recalls(ranks), ranks, top1


def community_t2i(sims: np.ndarray):
    """Text → image: per caption, argsort its column (a row of sims.T), reverse, find its image."""
    n_images = sims.shape[0]
    ranks = np.zeros(CAPTIONS * n_images)
    top1 = np.zeros(CAPTIONS * n_images)
    by_caption = sims.T
    for image in range(n_images):
        for k in range(CAPTIONS):
            caption = CAPTIONS * image + k
            order = np.argsort(by_caption[caption])[::-1]
            ranks[caption] = np.where(order == image)[0][0]
            top1[caption] = order[0]
    return _recalls(ranks), ranks, top1


def community(sims: np.ndarray) -> dict:
    i2t_metrics, i2t_ranks, i2t_top1 = community_i2t(sims)
    t2i_metrics, t2i_ranks, t2i_top1 = community_t2i(sims)
    return {
        "metrics": i2t_metrics + t2i_metrics,
        "i2t_ranks": i2t_ranks, "i2t_top1": i2t_top1,
        "t2i_ranks": t2i_ranks, "t2i_top1": t2i_top1,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_fast(sims, t2i: np.ndarray, repeats: int, device: torch.device):
    """Median and best wall time of ``repeats`` runs (after one warm-up run), and the result."""
    details = rank_details(sims, t2i)  # warm-up: allocator, kernels, caches
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        details = rank_details(sims, t2i)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), details


def _cpu() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "avx2": "avx2" in flags,
            "avx512": any(f.startswith("avx512") for f in flags)}


def _metrics_tuple(details) -> tuple[float, ...]:
    m = metrics_from_ranks(details.i2t_ranks, details.t2i_ranks)
    return tuple(m[f"{d}_{k}"] for d in ("i2t", "t2i") for k in ("r1", "r5", "r10", "medr", "meanr"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="1,000 × 5,000 instead of 5,000 × 25,000"
    )
    parser.add_argument("--device", default="cpu", help="where the fast routine runs (cpu, cuda)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the fast routine")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the float64 reference (the slowest part)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    n_images = 1000 if args.quick else 5000
    n_texts = n_images * CAPTIONS
    load_before = os.getloadavg()

    sims32 = distinct_scores(n_images, n_texts, args.seed)
    t2i = np.repeat(np.arange(n_images), CAPTIONS)
    on_device = torch.from_numpy(sims32).to(device) if device.type != "cpu" else sims32

    fast_s, fast_best_s, fast = _time_fast(on_device, t2i, args.repeats, device)
    start = time.perf_counter()
    base = community(sims32)
    community_s = time.perf_counter() - start

    problems = []
    for field in FIELDS:
        if not np.array_equal(getattr(fast, field), base[field].astype(np.int64)):
            problems.append(f"fast and community {field} differ")
    if _metrics_tuple(fast) != base["metrics"]:
        problems.append("fast and community R@K/medr/meanr differ")

    result = {
        "benchmark": "retrieval ranks: counting vs the community's argsort evaluation",
        "date": datetime.date.today().isoformat(),
        "shape": [n_images, n_texts],
        "captions_per_image": CAPTIONS,
        "device": str(device),
        **_cpu(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_1min": {"before": round(load_before[0], 2)},
        "fast_float32_s": round(fast_s, 4),
        "fast_float32_best_s": round(fast_best_s, 4),
        "community_float32_s": round(community_s, 3),
        "speedup_vs_community": round(community_s / fast_s, 1),
    }
    if not args.no_reference:
        sims64 = sims32.astype(np.float64)
        on_device64 = torch.from_numpy(sims64).to(device) if device.type != "cpu" else sims64
        fast64_s, _, fast64 = _time_fast(on_device64, t2i, args.repeats, device)
        start = time.perf_counter()
        ref = rank_details_reference(sims64, t2i)
        reference_s = time.perf_counter() - start
        for field in FIELDS:
            if not np.array_equal(getattr(fast64, field), getattr(ref, field)):
                problems.append(f"fast (float64) and reference {field} differ")
            if not np.array_equal(getattr(fast64, field), getattr(fast, field)):
                problems.append(f"fast float64 and float32 {field} differ")
        result.update({
            "fast_float64_s": round(fast64_s, 4),
            "reference_float64_s": round(reference_s, 3),
            "speedup_vs_reference": round(reference_s / fast64_s, 1),
        })  # fmt: skip
    result["load_average_1min"]["after"] = round(os.getloadavg()[0], 2)
    result["same_results"] = not problems
    result["metrics"] = {k: round(v, 4) for k, v in fast.metrics().items()}
    result["numpy"], result["torch"] = np.__version__, torch.__version__
    emit(result, args.out)
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
